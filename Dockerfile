# syntax=docker/dockerfile:1
# The CPU image: every fedprint service (coordinator, gallery routers and shards, ICE).
#   docker build -t fedprint:0.1.0 .            (or: make image)
# Multi-stage: the stubs are generated and the virtual environment built in the first stage; the
# runtime stage holds that environment only, and runs as uid/gid 10001 (the Helm chart's default).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
# torch first and pinned, from PyTorch's CPU wheels: the default torch wheel is a multi-GB CUDA build.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY . .
# The gRPC stubs, regenerated from protos/ with the generator versions pyproject.toml pins (as
# `make proto` does), so the image never carries stale ones.
RUN python docker/pins.py grpcio-tools grpcio protobuf mypy-protobuf > /tmp/proto-tools.txt \
 && python -m venv /opt/proto-tools \
 && /opt/proto-tools/bin/pip install -r /tmp/proto-tools.txt \
 && /opt/proto-tools/bin/python protos/generate.py
RUN python -m venv /opt/fedprint \
 && /opt/fedprint/bin/pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
 && /opt/fedprint/bin/pip install . \
 && /opt/fedprint/bin/fedprint --help > /dev/null

FROM ${PYTHON_IMAGE}
RUN groupadd --gid 10001 fedprint \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin fedprint \
 && install -d -o 10001 -g 10001 /var/lib/fedprint
COPY --from=build /opt/fedprint /opt/fedprint
# Bytecode was compiled at install time: the containers run with a read-only root file system.
ENV PATH=/opt/fedprint/bin:${PATH} PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    HOME=/tmp MPLCONFIGDIR=/tmp/matplotlib
USER 10001:10001
WORKDIR /var/lib/fedprint
# gRPC (mTLS), plaintext gRPC health for probes, Prometheus /metrics.
EXPOSE 50051 50052 9090
ENTRYPOINT ["fedprint"]
CMD ["--help"]
