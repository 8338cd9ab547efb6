#!/usr/bin/env bash
# Issue #28's grid of ours on the GPU machine (benchmarks/load_grid.py), from the repository root with
# .gpu-serving carried (bash scripts/prepare-gpu-serving-carry.sh), after the TE and Triton installs of
# docs/gpu.md. It makes the environment .gpu-serving/run.sh makes for its server benchmark, from the same
# carried files: numpy 1.26 ahead of everything, the repository and client/ through a .pth in python3's
# site-packages (Triton's Python stub runs isolated and ignores PYTHONPATH; under numpy 2 it sends empty
# outputs), removed when this script ends; the tokenizer; the random gemma-2b-shaped checkpoint. Then
#   python3 -m benchmarks.load_grid ours --checkpoint $WORK/gemma-2b-random --out $OUT/ours.jsonl "$@"
# under `timeout -s INT $LIMIT` (the interrupt stops the server; what was measured stays).
#   OUT=DIR [LIMIT=540] [WORK=/tmp/gemma-serving] [PYTHON=python3] [LAYERS=18] [MONITOR=SECONDS] \
#       bash benchmarks/load_grid_gpu.sh [load_grid ours options]
# Leaves under $OUT: ours.jsonl, progress.log (stderr), ours.server.log (its last 400 lines), and with
# MONITOR, monitor.log.gz: every MONITOR seconds, top and a `py-spy dump --nonblocking` of each Triton
# Python stub (py-spy where installed), to tell whether the stubs or the engine process bound a run.
set -uo pipefail
repo=$(pwd)
carry=$repo/.gpu-serving
py=${PYTHON:-python3}
work=${WORK:-/tmp/gemma-serving}
out=${OUT:?set OUT to the results directory}
[[ -f $carry/tokenizer.json.gz ]] || { echo "no $carry: carry .gpu-serving (scripts/prepare-gpu-serving-carry.sh)" >&2; exit 1; }
mkdir -p "$work" "$out"

source "$repo/scripts/triton_stub_env.sh" && triton_stub_env "$py" "$carry" "$work" "$repo/benchmarks/load_grid_gpu.sh" || exit 1

tok=$work/tokenizer
ckpt=$work/gemma-2b-random
mkdir -p "$tok"
gunzip -c "$carry/tokenizer.json.gz" > "$tok/tokenizer.json" && cp "$carry/tokenizer_config.json" "$tok/" || exit 1
# One made earlier on this machine (.gpu-serving/run.sh, ~/vllm-carry/run.sh) is used as it is.
if ! "$py" -c "import sys; from pathlib import Path; from benchmarks.vllm_baseline import checkpoint_problems
sys.exit(bool(checkpoint_problems(Path(sys.argv[1]))))" "$ckpt"; then
  "$py" -m benchmarks.random_checkpoint --out "$ckpt" --tokenizer "$tok" --layers "${LAYERS:-18}" || exit 1
fi

monitor() {
  while true; do
    echo "=== $(date +%T)"; top -b -n1 -w 200 | head -25
    for pid in $(pgrep -f triton_python_backend_stub); do
      echo "--- stub $pid"; command -v py-spy > /dev/null && timeout 5 py-spy dump --nonblocking -p "$pid" 2>&1 | head -60
    done
    sleep "$MONITOR"
  done > "$out/monitor.log"
}
if [[ -n ${MONITOR:-} ]]; then monitor & monitor_pid=$!; fi

timeout -s INT -k 30 "${LIMIT:-540}" "$py" -m benchmarks.load_grid ours --checkpoint "$ckpt" --out "$out/ours.jsonl" \
  "$@" 2> >(tee "$out/progress.log" >&2)
rc=$?
if [[ -n ${monitor_pid:-} ]]; then kill "$monitor_pid"; wait "$monitor_pid" 2>/dev/null; gzip -f "$out/monitor.log"; fi
tail -n 400 "$out/ours.server.log" > "$out/ours.server.log.tail" 2>/dev/null && mv "$out/ours.server.log.tail" "$out/ours.server.log"
exit "$rc"
