#!/usr/bin/env bash
# Session 18 call A. carry .gpu .lean .e2epack
d=/tmp/lf; [ -d $d/site ] || { mkdir -p $d; tar xJf .gpu/site.tar.xz -C $d; pip install -q --no-index --no-deps --target $d/site .lean/*.whl >/dev/null 2>&1; tar xJf .e2epack/e2e.tar.xz -C $d; }
export HF_HUB_OFFLINE=1 LORAFORGE_CACHE=/tmp/lfcache PYTHONUNBUFFERED=1 PYTHONPATH=$d/site:$PWD/src
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpu.txt
mkdir -p $OUT/w; t0=$(date +%s); D=${DEADLINE:-585}; left() { echo $(( D - $(date +%s) + t0 )); }
fin() { cd $OUT && tar czf all.tgz w && rm -rf w; echo "total $(( $(date +%s) - t0 )) s"; }
trap fin EXIT
row() { python -c "import json;[print({k:v for k,v in r.items() if k in ('tool','tokens_per_s','bench_tokens_per_s','bench_tokens_per_s_seq64','train_seconds','seconds_in','peak_reserved_gib','final_val_loss','steps','error')}) for r in json.load(open('$1'))['rows']]" 2>&1 | tail -3; }
e2e() { timeout $(( $(left) - 5 )) python bench/train_e2e.py run --data $d/.e2e --smol $d/.e2e/tok --runs 135m-banking77 --tools loraforge --epochs 3 --timeout 100 "$@"; }
timeout 60 python bench/optimizer_host.py --out $OUT/w/optimizer_host_cuda.json > /dev/null 2>&1; timeout 60 python bench/optimizer_host.py --tiny --out $OUT/w/optimizer_host_cuda_tiny.json 2>&1 | grep -A4 ratio
# 1. 135M BANKING77 3 epochs, flat optimizer (new default), with the bench rates
e2e --bench-rate --out $OUT/w/e2e_135m_flat.json > $OUT/w/e2e_135m_flat.log 2>&1; row $OUT/w/e2e_135m_flat.json; echo "t=$(( $(date +%s) - t0 ))"
# 2. the same without the flat optimizer (per-tensor AdamW, as session 17)
patch -p1 -s < .lean/noflat.patch && { e2e --out $OUT/w/e2e_135m_noflat.json > $OUT/w/e2e_135m_noflat.log 2>&1; patch -R -p1 -s < .lean/noflat.patch; }; row $OUT/w/e2e_135m_noflat.json; echo "t=$(( $(date +%s) - t0 ))"
# 3. flat + small-batch loss through _LinearLogp
patch -p1 -s < .lean/small_loss.patch && { e2e --out $OUT/w/e2e_135m_smallloss.json > $OUT/w/e2e_135m_smallloss.log 2>&1; patch -R -p1 -s < .lean/small_loss.patch; }; row $OUT/w/e2e_135m_smallloss.json; echo "t=$(( $(date +%s) - t0 ))"
# 4. GPU tests: graphs twice (gc paused during capture now), CUDA training (flat optimizer + graphs), host embedding, preference
for i in 1 2; do timeout 70 python -m pytest -q tests/gpu/test_fast_gpu.py -k graph > $OUT/w/graph_tests_$i.txt 2>&1; tail -1 $OUT/w/graph_tests_$i.txt; done
timeout $(( $(left) - 70 )) python -m pytest -q tests/gpu/test_cuda_train.py tests/gpu/test_host_embedding_gpu.py tests/gpu/test_preference_gpu.py > $OUT/w/gpu_tests.txt 2>&1; tail -1 $OUT/w/gpu_tests.txt; echo "t=$(( $(date +%s) - t0 ))"
# 5. dropout kernel candidate
timeout $(( $(left) - 3 )) python bench/dropout_kernel.py --out $OUT/w/dropout_kernel.json > $OUT/w/dropout_kernel.log 2>&1; tail -25 $OUT/w/dropout_kernel.log | grep -v "^ " | head
