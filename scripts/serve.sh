#!/usr/bin/env bash
# `make serve`: tritonserver in the foreground with model_repository/ and the default Gemma 3 270M.
# Ports: HTTP_PORT, GRPC_PORT, METRICS_PORT (8000/8001/8002). Model settings: GEMMA_* variables
# (see model_repository/gemma/config.pbtxt), e.g. GEMMA_CHECKPOINT=/path/to/hf_checkpoint.
# Extra arguments go to tritonserver (or `--print-env`: show the command, start nothing).
# Ctrl-C stops the server: the python helper execs tritonserver, so the signal goes straight to it.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The repo's venv (make setup); without one (a container image), the python3 on PATH. Either way
# it is the interpreter whose packages the model uses and whose libpython the backend stub embeds.
py="$root/.venv/bin/python"
[[ -x $py ]] || py=$(command -v python3)
cd "$root"
export HTTP_PORT=${HTTP_PORT:-8000} GRPC_PORT=${GRPC_PORT:-8001} METRICS_PORT=${METRICS_PORT:-8002}

# Both steps run backend/self_check.py and stop the script with its error rather than serve a model
# that would answer garbage (the engine checks again when Triton loads it).
if [[ -z ${GEMMA_CHECKPOINT:-} ]]; then
  echo "Preparing the default model (first run converts and checks the packaged GGUF, under a minute)..."
  GEMMA_CHECKPOINT=$("$py" -m backend.default_model | tail -n 1)
  export GEMMA_CHECKPOINT
elif [[ " $* " != *" --print-env "* ]]; then  # --print-env starts nothing, so has nothing to check
  "$py" -m backend.self_check "$GEMMA_CHECKPOINT"
fi
cat <<MSG
Serving $GEMMA_CHECKPOINT as model "gemma" once the log says READY:
  gRPC     localhost:$GRPC_PORT      $(dirname "$py")/gemma-client --url localhost:$GRPC_PORT generate "Why is the sky blue?"
  HTTP     curl -X POST localhost:$HTTP_PORT/v2/models/gemma/generate -d '{"text_input": "Why is the sky blue?", "max_tokens": 32}'
  stream   curl -N -X POST localhost:$HTTP_PORT/v2/models/gemma/generate_stream -d '{"text_input": "Hi", "stream": true}'
  metrics  curl localhost:$METRICS_PORT/metrics | grep gemma_
Ctrl-C stops the server.
MSG
exec "$py" scripts/tritonserver.py --model-repository "$root/model_repository" "$@"
