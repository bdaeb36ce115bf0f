# syntax=docker/dockerfile:1
# One Dockerfile, three images (all run as the non-root user 10001):
#   docker build -t dapo:0.1.0 .                                 # default: CUDA runtime (vLLM, DeepSpeed)
#   docker build --target operator -t dapo-operator:0.1.0 .      # slim operator, no torch
#   docker build --target runtime-cpu -t dapo:0.1.0-cpu .        # CPU-only runtime (kind e2e, laptops)
# The chart's image.* picks the operator image, runtimeImage.* the pods' default image.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# ----------------------------------------------------------------------------- shared slim base
FROM ${PYTHON_IMAGE} AS slim-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --gid 10001 dapo \
    && useradd --uid 10001 --gid 10001 --home-dir /home/dapo --create-home --shell /usr/sbin/nologin dapo
WORKDIR /opt/dapo

# ----------------------------------------------------------------------------- operator (slim)
# `dapo-operator run` and `dapo crd` import only dapo.spec, dapo.crd, dapo.cli and dapo_operator: pydantic,
# pyyaml, kopf, kubernetes, aiohttp, prometheus-client. `--no-deps` keeps torch and transformers
# (hard dependencies of the package for the runtime roles) out of this image.
FROM slim-base AS operator
COPY pyproject.toml README.md ./
COPY runtime/ runtime/
COPY operator/ operator/
RUN pip install \
        "kopf>=1.37" "kubernetes>=29" "pydantic>=2.7,<3" "pyyaml>=6" \
        "prometheus-client>=0.20" "aiohttp>=3.9" \
    && pip install --no-deps . \
    && python -c "import sys, dapo.cli, dapo.crd, dapo_operator.cli, dapo_operator.main; assert 'torch' not in sys.modules, 'the operator path imports torch'"
USER 10001:10001
EXPOSE 8080 8081
ENTRYPOINT ["dapo-operator"]
CMD ["run"]

# ----------------------------------------------------------------------------- runtime, CPU only
# Torch's CPU wheels keep this image around 1 GB instead of the CUDA build's ~10 GB.
FROM slim-base AS runtime-cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Distribution packages follow the base image's release; pinning them breaks on every base update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md ./
COPY runtime/ runtime/
COPY operator/ operator/
COPY examples/ examples/
# Versions come from pyproject.toml's ranges (and the project itself is `.`).
# hadolint ignore=DL3013
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch>=2.4,<3" \
    && pip install ".[deepspeed,smollm]"
# Writable places for a read-only root filesystem: the model/data cache and torch's JIT builds.
ENV DAPO_CACHE_DIR=/cache \
    TORCH_EXTENSIONS_DIR=/tmp/torch_extensions \
    HOME=/home/dapo
RUN mkdir -p /cache && chown 10001:10001 /cache
USER 10001:10001
EXPOSE 8000 29500 29600
ENTRYPOINT ["dapo"]
CMD ["--help"]

# ----------------------------------------------------------------------------- runtime, CUDA (default)
FROM ${CUDA_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# Ubuntu 24.04 ships Python 3.12; g++ lets DeepSpeed JIT-build its CPU-side ops.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && groupadd --gid 10001 dapo \
    && useradd --uid 10001 --gid 10001 --home-dir /home/dapo --create-home --shell /usr/sbin/nologin dapo
WORKDIR /opt/dapo
COPY pyproject.toml README.md ./
COPY runtime/ runtime/
COPY operator/ operator/
COPY examples/ examples/
# The gpu extra brings vLLM (which pins the matching CUDA torch) and DeepSpeed.
# hadolint ignore=DL3013
RUN pip install ".[gpu,smollm]"
ENV DAPO_CACHE_DIR=/cache \
    TORCH_EXTENSIONS_DIR=/tmp/torch_extensions \
    HOME=/home/dapo
RUN mkdir -p /cache && chown 10001:10001 /cache
USER 10001:10001
EXPOSE 8000 29500 29600
ENTRYPOINT ["dapo"]
CMD ["--help"]
