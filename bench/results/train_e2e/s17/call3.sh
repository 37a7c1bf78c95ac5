#!/usr/bin/env bash
# Session 17 call 3: host embedding + 8-bit Adam default for QLoRA: 8B ours vs Unsloth; 135m with profile
d=/tmp/lf; [ -d $d/site ] || { mkdir -p $d; tar xJf .gpu/site.tar.xz -C $d; pip install -q --no-index --no-deps --target $d/site .lean/*.whl >/dev/null 2>&1; tar xJf .e2epack/e2e.tar.xz -C $d; }
export HF_HUB_OFFLINE=1 LORAFORGE_CACHE=/tmp/lfcache PYTHONUNBUFFERED=1 PYTHONPATH=$d/site:$PWD/src
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpu.txt
mkdir -p $OUT/w; t0=$(date +%s)
fin() { cd $OUT && tar czf all.tgz w && rm -rf w; echo "total $(( $(date +%s) - t0 )) s"; }
trap fin EXIT
timeout 90 python -m pytest -q -x tests/gpu/test_host_embedding_gpu.py tests/gpu/test_cuda_train.py > $OUT/w/gpu_tests.txt 2>&1; tail -3 $OUT/w/gpu_tests.txt; echo "t=$(( $(date +%s) - t0 ))"
timeout 260 python bench/train_e2e.py run --data $d/.e2e --smol $d/.e2e/tok --runs 8b-mix --tools loraforge,unsloth-trl,loraforge-graphs --epochs 0.25 --timeout 100 --out $OUT/w/e2e_8b.json > $OUT/w/e2e_8b.log 2>&1
python -c "import json;[print({k:v for k,v in r.items() if k not in ('clock','plan_speed')}) for r in json.load(open('$OUT/w/e2e_8b.json'))['rows']]"; echo "t=$(( $(date +%s) - t0 ))"
timeout 100 python bench/train_e2e.py run --data $d/.e2e --smol $d/.e2e/tok --runs 135m-banking77 --tools loraforge --epochs 3 --timeout 90 --profile $OUT/w/prof --out $OUT/w/e2e_135m_prof.json > $OUT/w/e2e_135m_prof.log 2>&1
python -c "import json;[print({k:v for k,v in r.items() if k not in ('clock','plan_speed')}) for r in json.load(open('$OUT/w/e2e_135m_prof.json'))['rows']]"; echo "t=$(( $(date +%s) - t0 ))"
ls -la $OUT/w/prof/* 2>/dev/null | head; du -sh $OUT/w
