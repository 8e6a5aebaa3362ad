# egressd — the two quick-start commands are `make run` and `make test` (as root, on Debian 12).
# Each installs what it needs first: Debian packages (once; their services are not started, see
# lab/apt_install_quiet.sh) and the Python venv (when pyproject changes).

SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := build/.stamps

# Everything the daemon, the tests, the capture script and the benchmarks use.
APT_PACKAGES := python3 python3-venv python3-dev build-essential libnetfilter-queue-dev \
	iptables ipset nftables conntrack iproute2 iputils-ping kmod procps \
	openssh-server openssh-client openssl curl ncat socat microsocks dnsmasq-base dnsutils \
	tcpdump iperf3 libndpi-bin systemd chromium \
	mmdebstrap dropbear-bin rsync git sshuttle
# mmdebstrap: the container image's root file system from Debian packages (deploy/container/build_image.py,
# tests/e2e/test_image.py); no container runtime or registry needed.

# Real tunnel programs for pcaps/make_tunnels.py and tests/e2e/test_daemon_tunnels.py (Debian 12),
# and localtunnel's client from npm (installed into build/lab-npm, not system-wide).
LAB_APT_PACKAGES := iodine ptunnel-ng httptunnel dns2tcp openvpn tor tinc nebula shadowsocks-libev \
	simple-obfs obfs4proxy pagekite websockify python3-websockets wireguard-go wireguard-tools ike-scan \
	xl2tpd quicktun fastd
# detect/relays.py's captures (pcaps/make_tunnels.py vtun, yggdrasil)
LAB_APT_PACKAGES += vtun yggdrasil
LAB_APT_PACKAGES += n2n  # n2n 1.3's edge and supernode (pcaps/make_tunnels.py n2n)
LAB_NPM_PACKAGES := localtunnel@2.0.2

.PHONY: help setup deps lab-deps venv run demo test test-fast lint typecheck bench pcaps image k8s-policy clean

help:
	@echo "make run    - set up, then run the daemon on the shipped default policy in demo namespaces"
	@echo "make test   - set up, then lint, type-check and run the whole test suite (e2e needs root)"
	@echo "make bench  - replay and live benchmarks (ratios measured side by side)"
	@echo "make pcaps  - regenerate pcaps/ (and pcaps/tunnels/) from real programs in namespaces"
	@echo "make image  - the OCI image archive build/image/egressd-oci.tar (mmdebstrap, no container runtime)"

setup: deps venv

deps: $(STAMP)/apt
$(STAMP)/apt:
	@mkdir -p $(STAMP)
	@if ! command -v apt-get >/dev/null; then echo "apt-get not found: this setup targets Debian 12" >&2; exit 2; fi
	@if [ "$$(id -u)" != 0 ]; then echo "run as root: the setup installs Debian packages" >&2; exit 2; fi
	DEBIAN_FRONTEND=noninteractive apt-get update -q
	lab/apt_install_quiet.sh $(APT_PACKAGES)
	@touch $@

lab-deps: $(STAMP)/lab-apt $(STAMP)/lab-npm
$(STAMP)/lab-apt: $(STAMP)/apt
	@mkdir -p $(STAMP)
	@# Without starting their services on the host (tor, yggdrasil, xl2tpd, shadowsocks...): see the script.
	lab/apt_install_quiet.sh $(LAB_APT_PACKAGES)
	@# Debian's npm conflicts with a Node.js that came from elsewhere (NodeSource's nodejs ships
	@# its own npm): install Debian's only where no npm is on the machine.
	command -v npm >/dev/null || lab/apt_install_quiet.sh nodejs npm
	@touch $@
$(STAMP)/lab-npm: $(STAMP)/lab-apt
	@mkdir -p build/lab-npm
	cd build/lab-npm && npm install --no-audit --no-fund --silent $(LAB_NPM_PACKAGES)
	@touch $@

venv: $(STAMP)/venv
$(STAMP)/venv: pyproject.toml lab/pyproject.toml $(STAMP)/apt
	@mkdir -p $(STAMP)
	/usr/bin/python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]' -e ./lab
	@touch $@

run demo: setup
	$(PY) -m egressd_lab.demo

lint: venv
	$(VENV)/bin/ruff check egressd tests bench pcaps lab deploy
	$(VENV)/bin/ruff format --check egressd
	$(VENV)/bin/mypy --strict egressd lab/egressd_lab

test: setup lab-deps lint
	$(VENV)/bin/pytest -q -rs

test-fast: venv
	$(VENV)/bin/pytest -q -rs -m "not netns"

bench: setup
	$(PY) bench/replay.py
	$(PY) bench/live.py
	$(PY) bench/guard.py

pcaps: setup lab-deps
	$(PY) pcaps/make.py
	$(PY) pcaps/make_tunnels.py

image: setup
	$(PY) deploy/container/build_image.py

# The Kubernetes ConfigMap carries a copy of the shipped default (kustomize reads no file outside
# its directory); tests/test_kubernetes_manifests.py fails when the copy is stale.
k8s-policy:
	cp rules/default.yaml deploy/kubernetes/base/policy/default.yaml
	cp rules/lists/mining-pools.yaml deploy/kubernetes/base/policy/mining-pools.yaml
	cp rules/lists/tunnel-services.yaml deploy/kubernetes/base/policy/tunnel-services.yaml

clean:
	rm -rf build $(VENV) .mypy_cache .ruff_cache .pytest_cache
