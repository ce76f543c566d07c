# syntax=docker/dockerfile:1
#
# The BlockPull node agent image: `docker build -t blockpull-agent .` at the repository root.
#
# Both stages must use the same Python image: the virtualenv copied into the runtime stage
# points at the interpreter by absolute path. The tag is pinned to a patch release; pin the
# digest as well when publishing (`python:3.11.11-slim-bookworm@sha256:...`, as resolved by
# `docker buildx imagetools inspect`), so rebuilds are reproducible.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
# libvirt-python is published as an sdist: it compiles against Debian's libvirt headers (the
# Python API then follows that libvirt, bookworm's 9.0). Build tools stay in this stage.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libvirt-dev gcc pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Only what the wheel is built from (.dockerignore keeps tests, deploy/ and caches out).
COPY pyproject.toml README.md LICENSE ./
COPY operator/ operator/
# Build the project's wheel alone, then install it and its runtime dependencies - never the
# `dev` extras - into a venv without pip: the runtime image gets nothing it does not run
# (libvirt-python is compiled here, against libvirt-dev).
# pip compiles the .pyc files here, so the read-only runtime never needs to write them.
RUN python -m pip wheel --no-deps --wheel-dir /dist . \
 && python -m venv --without-pip /opt/venv \
 && python -m pip --python /opt/venv/bin/python install /dist/*.whl

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="blockpull-agent" \
      org.opencontainers.image.description="BlockPull node agent: flattens running QEMU VM disks" \
      org.opencontainers.image.licenses="Apache-2.0"
# Read-only root filesystem: never write bytecode; log unbuffered to the container runtime.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# libvirt's client library, which the compiled libvirt-python module links (libvirt.so.0);
# nothing else of libvirt: the agent only talks to a libvirtd through its socket.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libvirt0 \
 && rm -rf /var/lib/apt/lists/*
# The UID/GID the DaemonSet runs as (runAsUser/runAsGroup 10001); no home, no login shell.
RUN groupadd --system --gid 10001 blockpull \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin blockpull
COPY --from=builder /opt/venv /opt/venv
USER 10001:10001
WORKDIR /
ENTRYPOINT ["blockpull-agent"]
