# syntax=docker/dockerfile:1
# Client image: the gemma_client package, pytest and the end-to-end tests. Its command is the project's
# own test entry, scripts/e2e.sh, pointed at an external server through GEMMA_TEST_SERVER_URL (docker
# compose sets it to triton:8001).
#   docker build -f docker/client.Dockerfile -t gemma-triton-client .
FROM python:3.12.12-slim-bookworm

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTEST_ADDOPTS="-p no:cacheprovider"

WORKDIR /opt/gemma-triton
COPY client/ client/
# Only what the end-to-end tests import: tests/deploy/test_images.py checks tests/integration against
# this list.
RUN python3 -m pip install --no-cache-dir /opt/gemma-triton/client \
      "tritonclient[grpc,http]==2.73.0" "pytest==9.2.0" "pytest-timeout==2.4.0"
COPY pyproject.toml ./
COPY tests/ tests/
COPY scripts/e2e.sh scripts/

RUN groupadd --gid 10001 gemma \
 && useradd --create-home --uid 10001 --gid 10001 --shell /bin/bash gemma
USER 10001:10001

CMD ["bash", "scripts/e2e.sh"]
