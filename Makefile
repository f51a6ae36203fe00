# The README's two commands: `make demo` and `make test`. Each sets up its own .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install browser prometheus demo serve docs test test-e2e lint bench test-matrix test-starlette clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,demo]'
	touch $@

install: $(VENV)/.installed

# The demo's own venv: loopwatch and the demo extra only (FastAPI, uvicorn, rich), not the
# test tools (Playwright, the other servers, mypy...).
DEMO_VENV ?= .venv-demo
$(DEMO_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(DEMO_VENV)
	$(DEMO_VENV)/bin/python -m pip install -q --upgrade pip
	$(DEMO_VENV)/bin/python -m pip install -q -e '.[demo]'
	touch $@

# The article's benchmark measured here, with loopwatch's diagnosis beside it.
demo: $(DEMO_VENV)/.installed
	$(DEMO_VENV)/bin/python -m loopwatch demo $(DEMO_ARGS)

# The demo app alone, on 127.0.0.1:8000 (metrics at /metrics), with loopwatch's side port on
# 127.0.0.1:9100 (as in grafana/): the live page, live even while the loop is frozen.
SIDE_PORT ?= 9100
serve: $(DEMO_VENV)/.installed
	@echo "Live page: http://$(HOST):$(SIDE_PORT)/ (side port, live during a freeze); in the app: http://$(HOST):$(PORT)/metrics/ui"
	LOOPWATCH_METRICS_PORT=$(SIDE_PORT) LOOPWATCH_METRICS_HOST=$(HOST) $(DEMO_VENV)/bin/uvicorn demo_app.main:app --host $(HOST) --port $(PORT)

# The docs site (docs/, mkdocs-material), served with live reload.
DOCS_PORT ?= 8001
docs: install
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve -a $(HOST):$(DOCS_PORT)

LINTED := loopwatch tests demo_app grafana benchmarks scripts

# Debian's chromium for the live page's browser tests (Playwright drives it; it downloads no
# browser of its own). Installed when missing and we are root; otherwise those tests skip
# (under CI=true they fail).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "make: installing Debian package chromium (the live page's browser tests)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	  else \
	    echo "make test: chromium not on PATH: the live page's browser tests are SKIPPED (apt-get install chromium; under CI=true they fail)"; \
	  fi; }

# Debian's prometheus (promtool and a real server) for the dashboard's end-to-end tests, the
# same way: installed when missing and we are root; its system service, if the package
# starts one, is stopped (the tests run their own server).
prometheus:
	@command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "make: installing Debian package prometheus (the dashboard's end-to-end tests)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	    (systemctl stop prometheus || service prometheus stop || pkill -x prometheus || true) >/dev/null 2>&1; \
	  else \
	    echo "make test: prometheus/promtool not on PATH: the Grafana/Prometheus tests are SKIPPED (apt-get install prometheus; under CI=true they fail)"; \
	  fi; }

test: install browser prometheus
	$(PY) -m ruff check $(LINTED)
	$(PY) -m ruff format --check $(LINTED)
	$(PY) -m mypy
	$(PY) -m pytest $(PYTEST_ARGS)

# Dashboard lint, promtool checks and the real-Prometheus end-to-end run alone.
test-e2e: install
	$(PY) -m pytest tests/e2e/test_grafana.py tests/e2e/test_e2e_prometheus.py $(PYTEST_ARGS)

# Every CPython found (3.10-3.13) and the FastAPI/Starlette matrix, each in .venv-matrix/<name>.
test-matrix: install
	$(PY) scripts/test_matrix.py $(MATRIX_ARGS)

# Starlette's own test suite (from the sdist of the installed Starlette, asyncio and trio, its
# blockbuster guard on), bare and with every app wrapped in LoopWatchMiddleware, in a venv of
# its own (.venv-starlette); fails if a test fails wrapped but not bare. ~1 min on 2 cores.
test-starlette: install
	$(PY) scripts/starlette_suite.py $(STARLETTE_ARGS)

lint: install
	$(PY) -m ruff check $(LINTED)
	$(PY) -m ruff format --check $(LINTED)
	$(PY) -m mypy

# Figures for BENCHMARKS.md (~7 min on 2 cores), in a venv of its own so that httptools
# (uvicorn[standard]) never reaches the test venv; apt-get install wrk for the real load generator.
BENCH_VENV ?= .venv-bench
$(BENCH_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q -e '.[bench]'
	touch $@

bench: $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/python -m benchmarks.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .venv-* .pytest_cache .mypy_cache .ruff_cache site dist
