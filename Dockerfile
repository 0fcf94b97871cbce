# syntax=docker/dockerfile:1
# The compressor service: `compressor serve` (API + embedded worker) by default, or
# `compressor worker` for extra workers. Build the CPU image with
#   docker build -t compressor .
# and a CUDA worker image with a CUDA torch wheel (the wheel carries its own CUDA runtime; the
# host needs only the NVIDIA driver and container toolkit):
#   docker build -t compressor:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# The container refuses to serve on 0.0.0.0 without COMPRESSOR_API_KEYS; pass them at run time
# (docker run -e / an env file), never as a build argument.

# Both stages must share one Python: the runtime runs the builder's virtualenv as is.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS builder
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the chosen index, so `pip install .` finds its pin already satisfied
# instead of pulling the default (CUDA-bundling) wheel from PyPI.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY compressor ./compressor
COPY api ./api
RUN pip install . \
    && pip check

FROM ${BASE_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    COMPRESSOR_DATA_DIR=/data
RUN groupadd --system --gid 10001 compressor \
    && useradd --system --uid 10001 --gid compressor --create-home --home-dir /home/compressor \
        --shell /usr/sbin/nologin compressor \
    && mkdir /data \
    && chown compressor:compressor /data
COPY --from=builder /opt/venv /opt/venv
# numeric, so orchestrators can check runAsNonRoot without reading /etc/passwd
USER 10001:10001
WORKDIR /home/compressor
VOLUME /data
EXPOSE 8000
# slim images have no curl: ask /healthz with the standard library.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"]
CMD ["compressor", "serve", "--host", "0.0.0.0", "--port", "8000"]
