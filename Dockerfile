# gruserve serving image: the base install only (onnxruntime, FastAPI, uvicorn; no torch).
#
#   docker build -t gruserve:cpu .                           # CPU (default)
#   docker build --build-arg VARIANT=gpu -t gruserve:gpu .   # onnxruntime-gpu on a CUDA base
#   docker run --rm -p 8000:8000 -v "$PWD/models:/models:ro" gruserve:cpu
#
# See README.md (Deployment). tests/deploy/test_deploy_dockerfile.py checks this file offline.

ARG VARIANT=cpu

# -- bases: build and runtime stages of a variant share one, so the venv's python is there --
FROM python:3.11-slim-bookworm AS base-cpu

FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 AS base-gpu
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

# -- build: a venv holding the project, installed as `make serve` / CI install it --
# (DL3006 wants image tags; base-cpu / base-gpu are the stages above)
# hadolint ignore=DL3006
FROM base-${VARIANT} AS build
ARG VARIANT
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
# hadolint ignore=DL3013
RUN python3 -m venv /opt/venv && pip install --upgrade pip
# The grpc extra: the KServe v2 / Triton gRPC port (GRUSERVE_GRPC_PORT), no training stack.
# onnxruntime-gpu and the CPU onnxruntime the base install pulls in are one Python package
# (`onnxruntime`) in two wheels; the GPU image keeps only the GPU build.
# hadolint ignore=DL3013
RUN if [ "$VARIANT" = gpu ]; then \
        pip install '.[gpu,grpc]' \
        && pip uninstall -y onnxruntime onnxruntime-gpu \
        && pip install --no-deps onnxruntime-gpu; \
    else \
        pip install '.[grpc]'; \
    fi

# -- runtime: the venv, the demo model and an unprivileged user --
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    GRUSERVE_HOST=0.0.0.0 \
    GRUSERVE_PORT=8000 \
    GRUSERVE_GRPC_PORT=8001 \
    GRUSERVE_MODELS_DIR=/models
# HOME=/tmp: the only writable place under a read-only root (onnxruntime keeps a cache in ~).
RUN useradd --system --uid 10001 --user-group --home-dir /tmp --shell /usr/sbin/nologin gruserve
COPY --from=build /opt/venv /opt/venv
# The bundled demo; mount your own repository over it read-only (-v ./models:/models:ro).
COPY models /models
WORKDIR /srv/gruserve
USER 10001:10001
# HTTP (GRUSERVE_PORT) and KServe v2 gRPC (GRUSERVE_GRPC_PORT)
EXPOSE 8000 8001
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('GRUSERVE_PORT', '8000'), timeout=2)"]
# SIGTERM: stop accepting, finish in-flight requests (up to 10 s), then exit.
STOPSIGNAL SIGTERM
CMD ["gruserve", "serve"]
