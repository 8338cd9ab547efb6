# syntax=docker/dockerfile:1
# Gateway image: the OpenAI-compatible HTTP API (gateway/, docs/gateway.md) on port 9000, in front of
# a Triton server that it reaches over gRPC at GEMMA_TRITON_URL (docker compose: the triton service).
# No torch and no model: it only speaks HTTP and gRPC.
#   docker build -f docker/gateway.Dockerfile -t gemma-triton-gateway .
FROM python:3.12.12-slim-bookworm

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    GEMMA_TRITON_URL=triton:8001

WORKDIR /opt/gemma-triton
COPY client/ client/
# The client library and the pins of pyproject.toml's `gateway` extra (tests/deploy/test_images.py
# checks they agree). The project itself is not installed: its dependencies include torch.
RUN python3 -m pip install --no-cache-dir /opt/gemma-triton/client \
      "tritonclient[grpc]==2.73.0" "fastapi==0.165.0" "uvicorn==0.54.0"
COPY gateway/ gateway/
# The server pod's health probe script: /health applies its rules (gateway/engine_health.py loads it here).
COPY deploy/k8s/base/health.py deploy/k8s/base/health.py

RUN groupadd --gid 10001 gemma \
 && useradd --create-home --uid 10001 --gid 10001 --shell /bin/bash gemma
USER 10001:10001

EXPOSE 9000
CMD ["python3", "-m", "gateway", "--host", "0.0.0.0", "--port", "9000"]
