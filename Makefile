# Entry points for what people do with this repo. Each target sets up .venv itself when needed.
PY := .venv/bin/python
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
OPENAI_HOST ?= 127.0.0.1
OPENAI_PORT ?= 9000
GEMMA_TRITON_URL ?= localhost:$(GRPC_PORT)

.PHONY: setup serve gateway test test-gpu bench soak chaos aiperf model lint

setup:
	@bash scripts/setup_venv.sh

# Start tritonserver in the foreground with model_repository/ and the default Gemma 3 270M model, and
# the OpenAI-compatible gateway beside it on OPENAI_PORT (OPENAI_PORT=0: no gateway). Ctrl-C stops both.
serve: setup
	@gateway=; if [ "$(OPENAI_PORT)" != 0 ]; then \
	  $(PY) -m gateway --host $(OPENAI_HOST) --port $(OPENAI_PORT) --triton-url localhost:$(GRPC_PORT) \
	    --triton-metrics-url http://localhost:$(METRICS_PORT)/metrics & gateway=$$!; \
	  echo "OpenAI-compatible API: http://$(OPENAI_HOST):$(OPENAI_PORT)/v1 (docs/gateway.md)"; fi; \
	trap '[ -z "$$gateway" ] || kill $$gateway 2>/dev/null' EXIT; \
	HTTP_PORT=$(HTTP_PORT) GRPC_PORT=$(GRPC_PORT) METRICS_PORT=$(METRICS_PORT) bash scripts/serve.sh

# The OpenAI-compatible HTTP API (docs/gateway.md) on OPENAI_PORT, in front of the Triton server at
# GEMMA_TRITON_URL (gRPC; start one with `make serve`). OPENAI_HOST=0.0.0.0 listens on all interfaces.
gateway: setup
	$(PY) -m gateway --host $(OPENAI_HOST) --port $(OPENAI_PORT) --triton-url $(GEMMA_TRITON_URL)

# The whole CPU suite: unit, HF-parity and engine tests, then the end-to-end tests against a real
# tritonserver (scripts/e2e.sh: the same script the compose client container runs).
test: setup
	$(PY) -m pytest -q tests --ignore=tests/integration
	bash scripts/e2e.sh

# GPU tests (TransformerEngine); run on a CUDA machine, see docs/gpu.md.
test-gpu:  # the fused-kernel tests run compiled where CUDA is (in Triton's interpreter elsewhere)
	python3 -m pytest -q -m gpu tests
	python3 -m pytest -q tests/test_fused_decode.py tests/test_fused_varlen.py

bench: setup
	$(PY) -m benchmarks.run

# Streamed requests with random cancellation and mixed sampling against a server it starts (default
# model, CPU), then the accounting and the stub's memory by quarter: benchmarks/soak.py, docs/soak.md.
# Options: make soak SOAK_ARGS="--requests 1000 --concurrency 8".
soak: setup
	$(PY) -m benchmarks.soak $(SOAK_ARGS)

# The engine's own failures under streamed load against a server it starts (default model, CPU): the
# engine process killed, then hung, then the stub killed (and the server restarted, as Kubernetes would);
# per fault what failed, how fast requests stream again, readiness, leftovers, memory: benchmarks/chaos.py,
# docs/soak.md. Options: make chaos CHAOS_ARGS="--streams 16 --rounds 2".
chaos: setup
	$(PY) -m benchmarks.chaos $(CHAOS_ARGS)

# NVIDIA's AIPerf against the OpenAI gateway of a server it starts (default model, CPU): streamed chat and
# completions, fixed input/output tokens, a concurrency sweep; checks every request and its usage:
# benchmarks/aiperf_run.py, docs/benchmarks.md ("AIPerf against the gateway"). AIPerf lives in its own
# venv (.venv-aiperf, made here on first use; not a project dependency: Python >= 3.11, ~1.2 GB).
# Options: make aiperf AIPERF_ARGS="--concurrency 1,4,8 --output-tokens 128 --compare".
AIPERF_VERSION ?= 0.13.0
aiperf: setup
	@test -x .venv-aiperf/bin/aiperf || { python3 -m venv .venv-aiperf && \
	  .venv-aiperf/bin/pip install -q aiperf==$(AIPERF_VERSION); }
	$(PY) -m benchmarks.aiperf_run $(AIPERF_ARGS)

# Convert the packaged GGUF into a cached HF checkpoint directory and print its path.
model: setup
	@$(PY) -m backend.default_model
