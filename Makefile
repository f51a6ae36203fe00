# The README's two commands: `make demo` and `make test`. Each sets up its own .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install demo serve test lint bench test-matrix clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,demo]'
	touch $@

install: $(VENV)/.installed

# The article's benchmark measured here, with loopwatch's diagnosis beside it.
demo: install
	$(VENV)/bin/uvicorn demo_app.main:app --host $(HOST) --port $(PORT)

# The demo app alone, on 127.0.0.1:8000 (metrics at /metrics).
serve: install
	$(VENV)/bin/uvicorn demo_app.main:app --host $(HOST) --port $(PORT)

test: install
	$(PY) -m ruff check loopwatch tests demo_app
	$(PY) -m ruff format --check loopwatch tests demo_app
	$(PY) -m mypy
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check loopwatch tests demo_app
	$(PY) -m ruff format --check loopwatch tests demo_app
	$(PY) -m mypy

clean:
	rm -rf $(VENV) .venv-* .pytest_cache .mypy_cache .ruff_cache
