# Both targets set themselves up from a fresh clone: a .venv with the project installed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench setup sysdeps clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

# Byte-compile our own modules (an editable install is not compiled, and with
# PYTHONDONTWRITEBYTECODE set every CLI run would compile them again: ~0.3 s per command).
setup: $(VENV)/.installed
	@$(PY) -m compileall -q p2pbackup daemon cli >/dev/null

# `make demo KEEP=1` keeps the laptop's daemon running so the console address it ends with opens.
# The second part (two homes behind NAT replicating through the broker) needs root, network
# namespaces and coturn; it says so in one line and is skipped without them.
demo: setup
	$(PY) -m p2pbackup.cli.demo $(if $(KEEP),--keep)
	$(PY) bench/demo_homes.py

# Network-namespace tests (pairing over mDNS, transports) need iproute2, the packet-loss test
# iptables, the WebDAV store tests nginx with its dav-ext module, the web console's browser
# tests Debian's chromium (Playwright drives it: never `playwright install`, whose browser
# download is not reachable), the broker's TURN test and the NAT tests coturn's turnserver,
# the broker's fleet tests PostgreSQL's initdb and pg_ctl; as root we install them.
sysdeps:
	@if [ "$$(id -u)" = 0 ] && ! (command -v ip && command -v iptables && \
			test -x /usr/bin/chromium) >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq iproute2 iptables chromium; fi
	@if [ "$$(id -u)" = 0 ] && ! [ -e /usr/lib/nginx/modules/ngx_http_dav_ext_module.so ]; then \
		apt-get update -qq && apt-get install -y -qq nginx libnginx-mod-http-dav-ext; fi
	@if [ "$$(id -u)" = 0 ] && ! command -v turnserver >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq coturn; fi
	@if [ "$$(id -u)" = 0 ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		apt-get update -qq && apt-get install -y -qq postgresql; fi

test: setup sysdeps
	$(PY) -m pytest -q -p no:cacheprovider

bench: setup
	command -v restic >/dev/null || (apt-get update -qq && apt-get install -y -qq restic)
	$(PY) bench/bench_restic.py
	$(PY) bench/bench_daemon.py
	$(PY) bench/bench_replication.py --write-results
	$(PY) bench/bench_scale.py --write-results

clean:
	rm -rf $(VENV) build *.egg-info
