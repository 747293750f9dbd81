# JAI Serve: `make serve` (set up the runtime, archive your checkpoint or the shipped demo model, start)
# and `make test` (set up with the development packages too, run the whole suite). See README.md.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: serve test setup java torchserve-patch prometheus nginx haproxy web browser llama-server gguf demo archive start \
	stop status rotate-key update rollback multi-start multi-stop bench peer-bench clean

serve: setup nginx web archive start

test: setup $(VENV)/.installed-dev prometheus nginx haproxy web browser llama-server
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

# The front door on :8000 (deploy/nginx/jai.conf, scripts/front_door.py; tests/test_front_door.py runs it too):
# Debian's package, when we may install it
nginx:
	@command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || { [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx >/dev/null; }; }

# tests/test_scaleout.py and `make multi-start` put HAProxy in front of two torchserve instances: Debian's
# package, when we may install it
haproxy:
	@command -v haproxy >/dev/null || { [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends haproxy >/dev/null; }; }

# tests/test_gguf.py runs llama.cpp's llama-server on our GGUF export: its portable build, made once (minutes) from
# the llama.cpp sources in PyPI's llama-cpp-python into ~/.cache/jai-serve/llama.cpp (scripts/llama_server.py)
llama-server: $(VENV)/.installed-dev
	$(PY) scripts/llama_server.py --portable

# checkpoints/ckpt.pt + data/tokenizer.json -> jai.gguf, for llama.cpp and Ollama (docs/llama-cpp.md)
gguf: $(VENV)/.installed-dev
	$(PY) scripts/export_gguf.py --checkpoint $(or $(CHECKPOINT),checkpoints/ckpt.pt) \
	  --tokenizer $(or $(TOKENIZER),data/tokenizer.json) --out $(or $(OUT),jai.gguf) --outtype $(or $(OUTTYPE),f32)

# /docs and /redoc's viewers (web/package.json: swagger-ui-dist, redoc) from npm, into web/node_modules
web: web/node_modules/.installed

web/node_modules/.installed: web/package.json web/package-lock.json
	@command -v npm >/dev/null || { [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm >/dev/null; }; }
	cd web && npm ci --ignore-scripts --no-audit --no-fund --legacy-peer-deps --loglevel=error
	touch $@

# tests/test_front_door_browser.py drives Debian's chromium through its chromedriver (selenium)
browser:
	@{ command -v chromium >/dev/null && command -v chromedriver >/dev/null; } || { [ "$$(id -u)" != 0 ] || \
	  ! command -v apt-get >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; }; }

# Rebuilds the shipped demo model, demo/ckpt.pt and demo/tokenizer.json (about 2 minutes on 2 cores)
demo: $(VENV)/.installed-dev
	$(PY) scripts/make_demo_model.py --force

# Your checkpoint when there is one (archive.sh's defaults: checkpoints/ckpt.pt, data/tokenizer.json),
# else the shipped demo model
archive: $(VENV)/.installed
	./archive.sh $(if $(wildcard checkpoints/ckpt.pt),,--checkpoint demo/ckpt.pt --tokenizer demo/tokenizer.json)

# torchserve, then the front door on 127.0.0.1:8000 (nginx; without it torchserve alone, and a message)
start:
	scripts/serve.sh start
	$(PY) scripts/front_door.py start

stop:
	scripts/serve.sh stop; status=$$?; $(PY) scripts/front_door.py stop; exit $$status

# A new inference key, in force at once (the old one is refused); docs/front-door.md
rotate-key:
	scripts/serve.sh rotate-key

status:
	scripts/serve.sh status

# A new checkpoint live on the running server, no restart (docs/updates.md): make update CHECKPOINT=.. TOKENIZER=..
update: $(VENV)/.installed
	$(PY) scripts/update.py update --checkpoint "$(CHECKPOINT)" --tokenizer "$(TOKENIZER)"

rollback: $(VENV)/.installed
	$(PY) scripts/update.py rollback

# Two torchserve instances behind HAProxy on 127.0.0.1:8090 (scripts/multi.py; docs/scaling.md)
multi-start: setup archive haproxy
	$(PY) scripts/multi.py start

multi-stop:
	$(PY) scripts/multi.py stop

bench: $(VENV)/.installed-dev
	$(PY) bench/engine_bench.py

# JAI through TorchServe beside llama-server on the same checkpoint (docs/performance.md)
peer-bench: $(VENV)/.installed-dev torchserve-patch
	$(PY) bench/peer_bench.py --rounds 3

clean:
	rm -rf model_store logs logs.start.txt key_file.json multi
