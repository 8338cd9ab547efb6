# Sourced by the GPU machine's scripts that start tritonserver (.gpu-serving/run.sh, .gpu-model*/run.sh,
# benchmarks/load_grid_gpu.sh), from the repository root:
#   source scripts/triton_stub_env.sh && triton_stub_env PYTHON NUMPY_WHEEL_DIR WORK WRITER || exit 1
# and by those that must not see it (~/vllm-carry/run.sh, ~/aiperf-carry/run.sh: vLLM and AIPerf need
# the machine's numpy 2): source scripts/triton_stub_env.sh && drop_stale_stub_pth PYTHON
# Triton's Python backend stub runs Python isolated (PYTHONPATH ignored) on the site-packages of the
# python3 first on PATH (scripts/tritonserver.py puts its bin first), and it does read .pth files there.
# So one .pth, for this run only, gives the stub and the benchmark alike: numpy<2 ahead of everything
# (under numpy 2 the stub sends numpy-built outputs empty, docs/gpu.md "Triton lead"; the wheel is
# installed into WORK/numpy from NUMPY_WHEEL_DIR if PYTHON's numpy is 2), the repository (backend/,
# serving/) and client/ (gemma_protocol, gemma_client), not installed. An EXIT trap removes it.

stub_pth() {  # 00: before any other .pth could import numpy
  local site
  site=$("$1" -c 'import sysconfig; print(sysconfig.get_path("purelib"))') && echo "$site/00-gemma-serving.pth"
}

drop_stale_stub_pth() {  # one that a killed run left
  local pth
  pth=$(stub_pth "$1") || return 1
  if [[ -f $pth ]]; then echo "removing $pth, left by a run that was killed" >&2; rm -f "$pth"; fi
}

triton_stub_env() {
  local py=$1 wheels=$2 work=$3 writer=$4 repo lines
  local numpy1='import sys, numpy; print("numpy", numpy.__version__, numpy.__file__)
sys.exit(int(numpy.__version__.split(".")[0]) >= 2)'
  repo=$(pwd)
  TRITON_STUB_PTH=$(stub_pth "$py") || return 1
  trap 'rm -f "$TRITON_STUB_PTH"' EXIT
  rm -f "$TRITON_STUB_PTH"
  lines=("# written by $writer for one run; it removes this file when it ends")
  if ! "$py" -c "$numpy1" >/dev/null 2>&1; then
    "$py" -m pip install -q --no-index --no-deps --upgrade --target "$work/numpy" "$wheels"/numpy-1.26.4-*.whl >&2 \
      || return 1
    # A process started with GEMMA_MACHINE_NUMPY set keeps the machine's numpy 2 (AIPerf beside our
    # server: ~/aiperf-carry/run.sh). scipy and scikit-learn there need numpy 2; transformers imports
    # them only where find_spec finds them, and find_spec finds nothing for a name mapped to None.
    lines+=("import os, sys; os.environ.get('GEMMA_MACHINE_NUMPY') or sys.path.insert(0, '$work/numpy')")
    lines+=("import os, sys; os.environ.get('GEMMA_MACHINE_NUMPY') or sys.modules.update(sklearn=None, scipy=None)")
  fi
  lines+=("$repo" "$repo/client")
  printf '%s\n' "${lines[@]}" > "$TRITON_STUB_PTH" || return 1
  "$py" -c "$numpy1" || { echo "numpy<2 is not the numpy this Python imports" >&2; return 1; }
}
