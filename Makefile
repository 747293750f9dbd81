# JAI Serve: `make serve` (set up the runtime, archive your checkpoint or the shipped demo model, start)
# and `make test` (set up with the development packages too, run the whole suite). See README.md.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: serve test setup java torchserve-patch prometheus nginx haproxy demo archive start stop status multi-start \
	multi-stop bench clean

serve: setup archive start

test: setup $(VENV)/.installed-dev prometheus nginx haproxy
	$(PY) -m pytest

setup: $(VENV)/.installed java torchserve-patch

$(VENV)/.installed: requirements.txt
	$(PYTHON) -c 'import sys; sys.exit("Python 3.11+ needed, found " + sys.version.split()[0]) if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); scripts/ensure_venv_support.sh && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# Development and test packages on top of the runtime (requirements-dev.txt includes requirements.txt)
$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

java:
	scripts/ensure_java.sh

# The Java agent config.properties loads into TorchServe (docs/batching.md); rebuilt only when stale.
torchserve-patch: java
	torchserve-patch/build.sh

# tests/test_operations.py runs a real Prometheus against torchserve: Debian's package, when we may install it
prometheus:
	@command -v prometheus >/dev/null || { [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }; }

# tests/test_openai_e2e.py runs deploy/nginx/jai.conf in a real nginx: Debian's package, when we may install it
nginx:
	@command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || { [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx >/dev/null; }; }

# tests/test_scaleout.py and `make multi-start` put HAProxy in front of two torchserve instances: Debian's
# package, when we may install it
haproxy:
	@command -v haproxy >/dev/null || { [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends haproxy >/dev/null; }; }

# Rebuilds the shipped demo model, demo/ckpt.pt and demo/tokenizer.json (about 2 minutes on 2 cores)
demo: $(VENV)/.installed-dev
	$(PY) scripts/make_demo_model.py --force

# Your checkpoint when there is one (archive.sh's defaults: checkpoints/ckpt.pt, data/tokenizer.json),
# else the shipped demo model
archive: $(VENV)/.installed
	./archive.sh $(if $(wildcard checkpoints/ckpt.pt),,--checkpoint demo/ckpt.pt --tokenizer demo/tokenizer.json)

start:
	scripts/serve.sh start

stop:
	scripts/serve.sh stop

status:
	scripts/serve.sh status

# Two torchserve instances behind HAProxy on 127.0.0.1:8090 (scripts/multi.py; docs/scaling.md)
multi-start: setup archive haproxy
	$(PY) scripts/multi.py start

multi-stop:
	$(PY) scripts/multi.py stop

bench: $(VENV)/.installed-dev
	$(PY) bench/engine_bench.py

clean:
	rm -rf model_store logs logs.start.txt key_file.json multi
