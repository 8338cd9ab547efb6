# syntax=docker/dockerfile:1
# CPU server image (laptops, no GPU): the same project and scripts/serve.sh as the GPU image, on CPU
# PyTorch with engine=torch in float32, served by the Triton 2.51 that the nvidia-pytriton wheel bundles
# (scripts/tritonserver.py's fallback when no tritonserver is on PATH: what `make serve` and CI run).
#   docker build -f docker/server-cpu.Dockerfile -t gemma-triton-server:cpu .
# Runs on linux/amd64 and linux/arm64.
FROM python:3.12.12-slim-bookworm

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ARG TORCH_VERSION=2.11.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/gemma-triton/.venv \
    PATH=/opt/gemma-triton/.venv/bin:$PATH \
    GEMMA_MODEL_CACHE=/opt/gemma-triton/cache \
    GEMMA_ENGINE=torch \
    GEMMA_DTYPE=float32

# The project's .venv, where `make setup` puts it, belongs to the server's user: at its first start
# scripts/tritonserver.py assembles the bundled server's Python backend directory inside it.
RUN groupadd --gid 10001 gemma \
 && useradd --create-home --uid 10001 --gid 10001 --shell /bin/bash gemma \
 && mkdir -p /opt/gemma-triton/cache \
 && chown 10001:10001 /opt/gemma-triton /opt/gemma-triton/cache
USER 10001:10001

WORKDIR /opt/gemma-triton
RUN python3 -m venv .venv \
 && .venv/bin/python -m pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
 && echo "torch==${TORCH_VERSION}" > .venv/torch-constraint.txt

COPY --chown=10001:10001 pyproject.toml ./
COPY --chown=10001:10001 backend/ backend/
COPY --chown=10001:10001 serving/ serving/
COPY --chown=10001:10001 client/ client/
RUN python3 -m pip install --no-cache-dir -c .venv/torch-constraint.txt \
      "/opt/gemma-triton[default-model,triton]" /opt/gemma-triton/client
COPY --chown=10001:10001 model_repository/ model_repository/
COPY --chown=10001:10001 scripts/ scripts/

# The default checkpoint (packaged Gemma 3 270M) is converted once, here, into GEMMA_MODEL_CACHE;
# the assembled GGUF is dropped after. A conversion that fails its self-check fails the build.
RUN python3 -m backend.default_model \
 && rm -rf "${GEMMA_MODEL_CACHE}/gguf"

EXPOSE 8000 8001 8002
CMD ["bash", "scripts/serve.sh", "--model-control-mode=none"]
