# Deployline: `make demo` runs the pipeline on this machine, `make test` runs the tests.
# Both create .venv when it is missing or older than requirements.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
export PYTHONPATH := $(CURDIR)/plugins

.PHONY: demo test test-unit test-e2e bench venv clean

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

demo: $(STAMP)
	$(PY) -m deployline demo $(if $(HEADLESS),--headless) $(if $(AUTO_APPROVE),--auto-approve)

test: $(STAMP)
	$(PY) -m pytest

test-unit: $(STAMP)
	$(PY) -m pytest tests/unit tests/dags

test-e2e: $(STAMP)
	$(PY) -m pytest tests/e2e

bench: $(STAMP)
	$(PY) benchmarks/run.py

clean:
	rm -rf .demo .pytest_cache
