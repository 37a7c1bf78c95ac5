#!/usr/bin/env bash
d=/tmp/lf; [ -d $d/site ] || { mkdir -p $d; tar xJf .gpu/site.tar.xz -C $d; pip install -q --no-index --no-deps --target $d/site .lean/*.whl >/dev/null 2>&1; tar xJf .e2epack/e2e.tar.xz -C $d; }
export HF_HUB_OFFLINE=1 LORAFORGE_CACHE=/tmp/lfcache PYTHONUNBUFFERED=1 PYTHONPATH=$d/site:$PWD/src
mkdir -p $OUT/w; t0=$(date +%s)
fin() { cd $OUT && tar czf all.tgz w && rm -rf w; echo "total $(( $(date +%s) - t0 )) s"; }
trap fin EXIT
timeout 250 python bench/train_e2e.py run --data $d/.e2e --smol $d/.e2e/tok --runs 8b-mix --tools loraforge-graphs,loraforge-adam8,loraforge-graphs-adam8,loraforge --epochs 0.25 --timeout 100 --out $OUT/w/e2e_8b.json > $OUT/w/e2e_8b.log 2>&1
python -c "import json;[print({k:v for k,v in r.items() if k not in ('clock','plan_speed')}) for r in json.load(open('$OUT/w/e2e_8b.json'))['rows']]"; echo "t=$(( $(date +%s) - t0 ))"
timeout 110 python bench/train_e2e.py run --data $d/.e2e --smol $d/.e2e/tok --runs 135m-banking77 --tools loraforge --epochs 3 --timeout 100 --bench-rate --out $OUT/w/e2e_135m.json > $OUT/w/e2e_135m.log 2>&1
python -c "import json;[print({k:v for k,v in r.items() if k not in ('clock','plan_speed')}) for r in json.load(open('$OUT/w/e2e_135m.json'))['rows']]"; echo "t=$(( $(date +%s) - t0 ))"
