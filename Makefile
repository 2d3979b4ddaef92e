# Deployline: `make demo` runs the pipeline on this machine, `make test` runs the tests.
# Both create .venv when it is missing or older than requirements.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
export PYTHONPATH := $(CURDIR)/plugins

CHROMIUM := /usr/bin/chromium
.PHONY: demo test test-unit test-e2e test-distributed bench venv venv-checkov browser redis clean

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# checkov (the template security test) has a venv of its own: its pins clash with Airflow's.
CHECKOV_VENV := .venv-checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.requirements-installed

venv-checkov: $(CHECKOV_STAMP)

$(CHECKOV_STAMP): requirements-checkov.txt
	test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(CHECKOV_VENV)/bin/python -m pip install --quiet -r requirements-checkov.txt
	touch $@

demo: $(STAMP)
	$(PY) -m deployline demo $(if $(HEADLESS),--headless) $(if $(AUTO_APPROVE),--auto-approve)

# Debian's Chromium, for the end-to-end tests that render the UI plugin's pages (root can install it).
browser:
	@test -x $(CHROMIUM) || { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's chromium for the browser tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "no $(CHROMIUM): the browser tests will be skipped (apt-get install chromium)"; fi; }

# Unit and DAG tests on both cores (pytest-xdist); the end-to-end tests share one Airflow, serially.
test: $(STAMP) $(CHECKOV_STAMP) browser
	$(PY) -m pytest -n 2 tests/unit tests/dags
	$(PY) -m pytest tests/e2e

test-unit: $(STAMP) $(CHECKOV_STAMP)
	$(PY) -m pytest -n 2 tests/unit tests/dags

test-e2e: $(STAMP) browser
	$(PY) -m pytest tests/e2e

# Redis for the Celery cluster of test-distributed: Debian's redis-server (root can install it), or
# DEPLOYLINE_REDIS_SERVER=/path/to/redis-server.
redis:
	@test -n "$$DEPLOYLINE_REDIS_SERVER" || command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's redis-server for the Celery cluster tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  else echo "no redis-server: apt-get install redis-server, or set DEPLOYLINE_REDIS_SERVER" >&2; exit 1; fi; }

# The Compose topology as plain processes: PostgreSQL, Redis, Airflow's components and two Celery
# workers that share nothing but the database, the broker, git and S3 (docs/DEPLOYMENT.md).
test-distributed: $(STAMP) redis
	$(PY) -m pytest tests/distributed

bench: $(STAMP)
	$(PY) benchmarks/run.py

clean:
	rm -rf .demo .pytest_cache
