#!/usr/bin/env bash
d=/tmp/lf; [ -d $d/site ] || { mkdir -p $d; tar xJf .gpu/site.tar.xz -C $d; }
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=$d/site:$PWD/src
T="tests/gpu/test_fast_gpu.py"; K="-k graph"
timeout 60 python -m pytest -q -x "$T" $K 2>&1 | grep -E "passed|failed|Warning: CUDA graphs" | cut -c1-300
cp src/loraforge/model/fast/graphs.py /tmp/g_new.py; cp .lean/graphs_head.py src/loraforge/model/fast/graphs.py
echo "--- HEAD graphs.py"
timeout 60 python -m pytest -q -x "$T" $K 2>&1 | grep -E "passed|failed|Warning: CUDA graphs" | cut -c1-300
cp /tmp/g_new.py src/loraforge/model/fast/graphs.py
