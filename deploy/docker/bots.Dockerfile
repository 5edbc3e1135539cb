# syntax=docker/dockerfile:1
# Parley's bot process: `python -m bots [run|discord|telegram|http|keys|export]`.
#   docker build -f deploy/docker/bots.Dockerfile -t parley-bots .
# It talks to Redis (REDIS_URL) and to a model server (LLM_BASE_URL): the image has no
# engine and no embedded Redis. See deploy/README.md.

# Build stage: Parley and its platform extras into a virtual environment. Every dependency
# has a wheel for CPython 3.11 on Linux, so no compiler is installed here either.
FROM python:3.11.15-slim-bookworm AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY bots/ bots/
COPY inference/ inference/
# Not editable: the package lands in the venv, which is all the final stage copies.
# DL3013: this installs the local project; its dependencies' ranges are pyproject.toml's.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --prefer-binary ".[discord,telegram,http,kb]" \
    && pip uninstall --yes pip setuptools

# Final stage: the same base, the venv, a user; nothing else.
FROM python:3.11.15-slim-bookworm

RUN groupadd --system --gid 10001 parley \
    && useradd --system --uid 10001 --gid parley --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin parley \
    && mkdir -p /data \
    && chown parley:parley /data

COPY --from=builder /opt/venv /opt/venv

# Runs on a read-only root filesystem: the only writable paths are /tmp and DATA_DIR
# (mount a tmpfs or a volume on each); byte code was compiled at install time.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DATA_DIR=/data

WORKDIR /data
USER 10001:10001

# The HTTP channel (HTTP_PORT) and the ops server (OPS_PORT: /healthz, /readyz, /metrics).
EXPOSE 8080 9464
STOPSIGNAL SIGTERM
# Liveness from the ops server; no proxy, whatever HTTP_PROXY says.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:%s/healthz' % os.environ.get('OPS_PORT', '9464'), timeout=4)"]

ENTRYPOINT ["python", "-m", "bots"]
CMD ["run"]
