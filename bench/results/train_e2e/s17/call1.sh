#!/usr/bin/env bash
# Session 17 call 1. carry .gpu .lean .e2epack
d=/tmp/lf; mkdir -p $d; tar xJf .gpu/site.tar.xz -C $d; pip install -q --no-index --no-deps --target $d/site .lean/*.whl >/dev/null 2>&1
tar xJf .e2epack/e2e.tar.xz -C $d
export HF_HUB_OFFLINE=1 LORAFORGE_CACHE=/tmp/lfcache PYTHONUNBUFFERED=1 PYTHONPATH=$d/site:$PWD/src
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpu.txt
mkdir -p $OUT/w; t0=$(date +%s); D=${DEADLINE:-580}; left() { echo $(( D - $(date +%s) + t0 )); }
fin() { cd $OUT && tar czf all.tgz w && rm -rf w; echo "total $(( $(date +%s) - t0 )) s"; }
trap fin EXIT
python -c "import llguidance,sys;print('llguidance',llguidance.__version__ if hasattr(llguidance,'__version__') else '?')"
timeout 100 python -m pytest -q -x tests/gpu/test_long_gpu.py tests/gpu/test_preference_gpu.py tests/gpu/test_cuda_train.py > $OUT/w/gpu_tests.txt 2>&1; tail -3 $OUT/w/gpu_tests.txt; echo "t=$(( $(date +%s) - t0 ))"
timeout 240 python bench/train_e2e.py run --data $d/.e2e --smol $d/.e2e/tok --runs 8b-mix --tools loraforge,unsloth-trl,loraforge-nographs,loraforge-adam8,loraforge-adam8-chunk2k --epochs 0.25 --timeout 100 --out $OUT/w/e2e_8b.json > $OUT/w/e2e_8b.log 2>&1
python -c "import json;[print({k:v for k,v in r.items() if k not in ('clock','plan_speed')}) for r in json.load(open('$OUT/w/e2e_8b.json'))['rows']]"; echo "t=$(( $(date +%s) - t0 ))"
[ $(left) -gt 120 ] && timeout 110 python bench/train_e2e.py run --data $d/.e2e --smol $d/.e2e/tok --runs 135m-banking77 --tools loraforge --epochs 3 --timeout 100 --bench-rate --out $OUT/w/e2e_135m.json > $OUT/w/e2e_135m.log 2>&1
python -c "import json;[print({k:v for k,v in r.items() if k not in ('clock','plan_speed')}) for r in json.load(open('$OUT/w/e2e_135m.json'))['rows']]"; echo "t=$(( $(date +%s) - t0 ))"
[ $(left) -gt 60 ] && timeout $(( $(left) - 8 )) python bench/preference_speed.py --tokenizer $d/.e2e/tok --objectives dpo --tools loraforge,unsloth-trl --pairs 24 --timeout 70 --cache /tmp/lf-e2e --out $OUT/w/pref_dpo.json > $OUT/w/pref_dpo.log 2>&1
python -c "import json;[print(r) for r in json.load(open('$OUT/w/pref_dpo.json'))['rows']]"
