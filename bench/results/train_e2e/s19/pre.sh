# Session 19: set-up shared by the calls (sourced). The first call carries .gpu .lean .e2epack .v23; the machine
# keeps them for the later calls while it stays warm.
d=/tmp/lf; [ -d $d/site ] || { mkdir -p $d; tar xJf .gpu/site.tar.xz -C $d; pip install -q --no-index --no-deps --target $d/site .lean/*.whl >/dev/null 2>&1; tar xJf .e2epack/e2e.tar.xz -C $d; }
export HF_HUB_OFFLINE=1 LORAFORGE_CACHE=/tmp/lfcache PYTHONUNBUFFERED=1 PYTHONPATH=$d/site:$PWD/src
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpu.txt
mkdir -p $OUT/w; t0=$(date +%s); D=${DEADLINE:-585}; left() { echo $(( D - $(date +%s) + t0 )); }
fin() { cd $OUT && tar czf all.tgz w && rm -rf w; echo "total $(( $(date +%s) - t0 )) s"; }
trap fin EXIT
row() { python -c "import json;[print({k:v for k,v in r.items() if k in ('run','tool','tokens_per_s','planned_tokens_per_s','bench_tokens_per_s','bench_tokens_per_s_seq64','train_seconds','wall_seconds','peak_reserved_gib','final_val_loss','error')}) for r in json.load(open('$1'))['rows']]" 2>&1 | cut -c1-400 | tail -4; echo "t=$(( $(date +%s) - t0 ))"; }
# e2e NAME RUN TOOLS EPOCHS [more args]: one bench/train_e2e.py invocation under the call's deadline
e2e() { local n=$1 run=$2 tools=$3 ep=$4; shift 4; [ $(left) -gt 40 ] || { echo "skip $n"; return; }
  timeout $(( $(left) - 5 )) python bench/train_e2e.py run --data $d/.e2e --smol $SMOL --runs $run --tools $tools --epochs $ep --out $OUT/w/$n.json "$@" > $OUT/w/$n.log 2>&1; row $OUT/w/$n.json; }
SMOL=$d/.e2e/tok   # SmolLM2-135M's tokenizer: the 135m rows use its shape with random weights
