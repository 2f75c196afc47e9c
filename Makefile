# The two commands of the README. Each does all set-up on a fresh Debian/Ubuntu machine:
# system packages when missing (as root or through sudo), a virtualenv in .venv, the project in it.

VENV      ?= .venv
PY        := $(VENV)/bin/python
PYTHON    ?= python3
SUDO      := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# file:package pairs; the tests need the first three, the demo the first two, bench/outbox_fsync.py strace; the
# broker's rate-limit plugin (deploy/mosquitto/ratelimit, built by labkit when a test starts the shipped broker)
# gcc, the C library's and mosquitto's headers; the fleet page's browser test chromium and its chromedriver; the
# metrics tests Prometheus and promtool (tests/test_prometheus*.py); the clustered broker tier's tests nats-server
# (tests/test_nats_*.py start their own nodes on free ports; the package's own service, where systemd starts it,
# listens on 127.0.0.1:4222 and is not used).
SYSTEM_PACKAGES := /usr/sbin/mosquitto:mosquitto /usr/bin/influxd:influxdb /usr/bin/victoria-metrics:victoria-metrics \
	/usr/bin/strace:strace /usr/bin/gcc:gcc /usr/include/stdio.h:libc6-dev /usr/include/mosquitto.h:libmosquitto-dev \
	/usr/include/mosquitto_broker.h:mosquitto-dev /usr/bin/chromium:chromium /usr/bin/chromedriver:chromium-driver \
	/usr/bin/prometheus:prometheus /usr/sbin/nats-server:nats-server

# Only for the on-demand ARM targets (make gateway-bundle, make arm-check; docs/install.md): emulated Debian roots.
ARM_PACKAGES := /usr/sbin/debootstrap:debootstrap /usr/bin/qemu-arm-static:qemu-user-static \
	/usr/sbin/update-binfmts:binfmt-support
ARCH      ?= armhf

# make dist: the sdist, the wheel and an install bundle (the wheel, the sdist, examples/, systemd/, deploy/, docs/).
DIST      ?= dist
VERSION   := $(shell $(PYTHON) -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
BUNDLE    := citynerve-$(VERSION)

.PHONY: all test test-fault demo lint bench deps venv clean dist arm-deps gateway-bundle arm-check

all: test

# $(call install_missing,file:package pairs): apt-get install the packages whose file is missing.
define install_missing
	@missing=""; \
	for pair in $(1); do \
	  bin=$${pair%%:*}; pkg=$${pair##*:}; [ -e "$$bin" ] || missing="$$missing $$pkg"; \
	done; \
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi
endef

deps:
	$(call install_missing,$(SYSTEM_PACKAGES))

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "citynerve needs Python >= 3.11 (found $$($(PYTHON) --version))"; exit 1; }
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# The fault-injection runs (marked `fault`: minutes each, kill -9 and outages) are `make test-fault`; `make test`
# stays well under CI's 15 minutes on 2 cores.
test: deps venv
	$(PY) -m pytest -q -m "not fault"

test-fault: deps venv
	$(PY) -m pytest -q -m fault

demo: deps venv
	$(PY) -m labkit.demo

bench: deps venv
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) -m bench.run

dist: venv
	rm -rf $(DIST)/$(BUNDLE) $(DIST)/$(BUNDLE)-bundle.tar.gz $(DIST)/$(BUNDLE).tar.gz $(DIST)/$(BUNDLE)-py3-none-any.whl
	$(PY) -m build --no-isolation --outdir $(DIST) .
	mkdir -p $(DIST)/$(BUNDLE)
	tar -c --exclude='*.so' --exclude=__pycache__ README.md LICENSE examples systemd deploy docs | tar -x -C $(DIST)/$(BUNDLE)
	cp $(DIST)/$(BUNDLE)-py3-none-any.whl $(DIST)/$(BUNDLE).tar.gz $(DIST)/$(BUNDLE)/
	tar -C $(DIST) -czf $(DIST)/$(BUNDLE)-bundle.tar.gz $(BUNDLE)
	rm -rf $(DIST)/$(BUNDLE)
	@echo "$(DIST)/$(BUNDLE)-bundle.tar.gz: the wheel, the sdist, examples, systemd units, deploy files, docs"

arm-deps:
	$(call install_missing,$(ARM_PACKAGES))

# dist/citynerve-<version>-gateway-$(ARCH).tar.gz: every wheel the agent needs on a 32-bit (armhf) or 64-bit
# (arm64) Raspberry Pi, so that it installs there without a compiler (labkit/arm.py; 5-15 minutes).
gateway-bundle: arm-deps dist
	$(SUDO) $(PY) -m labkit.arm bundle --arch $(ARCH)

# The proof, on demand (not in make test; 15-30 minutes): each bundle installed by the documented commands in a
# clean emulated bookworm root without a compiler, and edge-agent poll-once reading a simulated meter.
arm-check: arm-deps dist
	$(SUDO) $(PY) -m labkit.arm check --arch arm64 --arch armhf

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build $(DIST) *.egg-info .pytest_cache .hypothesis
