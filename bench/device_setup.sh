#!/usr/bin/env bash
# Builds, in a fresh checkout, the ignored folders the GPU device calls carry (bench/results/train_e2e/s19/pre.sh
# reads them): .gpu (site packages incl. Unsloth, TRL, bitsandbytes, liger: ../shared/tools/pack-gpu-site.sh),
# .lean (wheels of loraforge's own needs the device lacks: datasketch, gguf, llguidance, optuna, orjson,
# jsonschema), .e2epack (bench/train_e2e.py's data files and SmolLM2-135M's tokenizer), .v23 (src/ and bench/ of
# two older commits, for before/after rows: V23="35ef30b 3882eed" by default). About 3 minutes; needs loraforge
# installed here (the README's second command) and ../shared. Each call then carries these four (~30 MB with the
# 12 MB tree; the device's limit is 64 MiB).
#   usage: bash bench/device_setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
for d in .gpu .lean .e2epack .e2e .v23; do grep -qx "$d/" .git/info/exclude 2>/dev/null || echo "$d/" >> .git/info/exclude; done
[ -f .gpu/site.tar.xz ] || bash ../shared/tools/pack-gpu-site.sh .gpu peers
mkdir -p .lean
dl() { "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 "$@" -d .lean; }
dl datasketch gguf optuna alembic sqlalchemy colorlog mako orjson jsonschema jsonschema-specifications referencing rpds-py attrs
dl --platform manylinux_2_31_x86_64 "llguidance>=1.7"   # pip matches manylinux_2_N exactly: 1.9.1 is 2_31 only
tok=$("$py" -c "from loraforge.model.load import resolve_base; print(resolve_base('smollm2-135m-instruct'))" | tail -1)
"$py" bench/train_e2e.py prepare --out .e2e
mkdir -p .e2e/tok && cp "$tok"/{chat_template.jinja,tokenizer.json,tokenizer_config.json,config.json,generation_config.json} .e2e/tok/
mkdir -p .e2epack && tar cf - .e2e | xz -T2 -6 > .e2epack/e2e.tar.xz
mkdir -p .v23 && rm -rf .v23/tree && mkdir .v23/tree
for c in ${V23:-35ef30b 3882eed}; do mkdir -p .v23/tree/$c && git archive "$c" src bench | tar x -C .v23/tree/$c && rm -rf .v23/tree/$c/bench/results; done
(cd .v23/tree && tar cf - * | xz -T2 -6 > ../v23.tar.xz) && rm -rf .v23/tree
du -sh .gpu .lean .e2epack .v23
