# The two commands of the README. Each does all set-up on a fresh Debian/Ubuntu machine:
# system packages when missing (as root or through sudo), a virtualenv in .venv, the project in it.

VENV      ?= .venv
PY        := $(VENV)/bin/python
PYTHON    ?= python3
SUDO      := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# file:package pairs; the tests need the first three, the demo the first two, bench/outbox_fsync.py strace; the
# broker's rate-limit plugin (deploy/mosquitto/ratelimit, built by labkit when a test starts the shipped broker)
# gcc, the C library's and mosquitto's headers; the fleet page's browser test chromium and its chromedriver; the
# metrics tests Prometheus and promtool (tests/test_prometheus*.py).
SYSTEM_PACKAGES := /usr/sbin/mosquitto:mosquitto /usr/bin/influxd:influxdb /usr/bin/victoria-metrics:victoria-metrics \
	/usr/bin/strace:strace /usr/bin/gcc:gcc /usr/include/stdio.h:libc6-dev /usr/include/mosquitto.h:libmosquitto-dev \
	/usr/include/mosquitto_broker.h:mosquitto-dev /usr/bin/chromium:chromium /usr/bin/chromedriver:chromium-driver \
	/usr/bin/prometheus:prometheus

.PHONY: all test test-fault demo lint bench deps venv clean

all: test

deps:
	@missing=""; \
	for pair in $(SYSTEM_PACKAGES); do \
	  bin=$${pair%%:*}; pkg=$${pair##*:}; [ -e "$$bin" ] || missing="$$missing $$pkg"; \
	done; \
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "citynerve needs Python >= 3.11 (found $$($(PYTHON) --version))"; exit 1; }
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

test: deps venv
	$(PY) -m pytest -q

test-fault: deps venv
	$(PY) -m pytest -q -m fault

demo: deps venv
	$(PY) -m labkit.demo

bench: deps venv
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) -m bench.run

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
