# syntax=docker/dockerfile:1
# GPU server image: Triton + PyTorch (CUDA) + TransformerEngine + this project; runs scripts/serve.sh.
#   docker build -f docker/server.Dockerfile -t gemma-triton-server:gpu .     (docker compose builds it)
#
# Base: Triton 25.10 = Triton 2.62, Ubuntu 24.04 with Python 3.12, CUDA 13.0.2. Its Python backend
# stub embeds that system Python 3.12, so torch, TransformerEngine and the project are installed into
# it. CUDA 13.0 needs an R580+ driver on the host (what our H100 hosts run) or a data-center driver
# with CUDA forward compatibility, which the image's entrypoint sets up.
FROM nvcr.io/nvidia/tritonserver:25.10-py3

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# torch built for the image's CUDA major.minor (cu130), and the TransformerEngine release that was run
# with this torch on an H100 (shared/gpu/README.md).
ARG TORCH_VERSION=2.11.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
ARG TE_VERSION=2.20.2

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONUNBUFFERED=1 \
    GEMMA_MODEL_CACHE=/opt/gemma-triton/cache

# TE's PyTorch extension is C++ only (a CppExtension) and is compiled here: it needs g++ and the CUDA
# headers (the image's /usr/local/cuda, else those of torch's nvidia-* wheels), no GPU.
# Ubuntu's archive keeps only the current build of a package, so its version is not pinned: the base
# image tag pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/*

# The constraints file keeps every later install on this torch (pip would otherwise be free to swap
# it for PyPI's build).
RUN python3 -m pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
 && echo "torch==${TORCH_VERSION}" > /etc/pip-torch-constraint.txt \
 && python3 -m pip install --no-cache-dir -c /etc/pip-torch-constraint.txt \
      "setuptools==80.9.0" "wheel==0.48.0" "packaging==26.4" "ninja==1.13.2"

# TransformerEngine: the prebuilt core library for CUDA 13 plus the PyTorch extension built from its
# source distribution against the torch above (--no-build-isolation, never a downloaded binary).
RUN NVTE_FRAMEWORK=pytorch NVTE_PYTORCH_FORCE_BUILD=TRUE MAX_JOBS="$(nproc)" \
    python3 -m pip install --no-cache-dir --no-build-isolation -c /etc/pip-torch-constraint.txt \
      "transformer_engine[pytorch,core_cu13]==${TE_VERSION}" \
 && python3 -c "import importlib.metadata as m; print('transformer_engine_torch', m.version('transformer_engine_torch'))"

# The project: the engine package (+ the packaged default model's converter) and the client.
WORKDIR /opt/gemma-triton
COPY pyproject.toml ./
COPY backend/ backend/
COPY serving/ serving/
COPY client/ client/
RUN python3 -m pip install --no-cache-dir -c /etc/pip-torch-constraint.txt \
      "/opt/gemma-triton[default-model]" /opt/gemma-triton/client
COPY model_repository/ model_repository/
COPY scripts/ scripts/

RUN groupadd --gid 10001 gemma \
 && useradd --create-home --uid 10001 --gid 10001 --shell /bin/bash gemma \
 && mkdir -p "${GEMMA_MODEL_CACHE}" \
 && chown 10001:10001 "${GEMMA_MODEL_CACHE}"
USER 10001:10001

# The default checkpoint (packaged Gemma 3 270M, GGUF -> HF safetensors) is converted once, here, into
# GEMMA_MODEL_CACHE; the assembled GGUF is dropped after. The conversion does not go through
# transformers, and its self-check (backend/self_check.py: tokenizer ids, greedy continuations) fails
# the build rather than bake in a model that would serve garbage. Another checkpoint:
# GEMMA_CHECKPOINT=<dir> (compose mounts the host's GEMMA_CHECKPOINT_DIR at /checkpoint and sets it).
RUN python3 -m backend.default_model \
 && rm -rf "${GEMMA_MODEL_CACHE}/gguf"

EXPOSE 8000 8001 8002
# The image's own entrypoint (NVIDIA's banner and CUDA compatibility setup) runs this command.
CMD ["bash", "scripts/serve.sh", "--model-control-mode=none"]
