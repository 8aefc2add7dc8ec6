# Two commands do all set-up on a fresh Debian machine: `make demo` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEBS   := libvirt-dev pkg-config python3-venv gcc python3-dev qemu-system-x86 qemu-utils libvirt-daemon-driver-qemu \
          libvirt-daemon libvirt-clients e2fsprogs rsync iproute2 iputils-ping \
          dnsmasq-base udhcpc nftables procps tmux openssh-server python3-apt

.PHONY: demo demo-qemu test lint typecheck deps clean bench

# The sans-IO cores: typed strictly (no Any leaking out, every function annotated).
CORES  := vivaldi/coordinate.py agents/network/plan.py agents/network/uplink.py overlay/chord.py overlay/membership.py overlay/quorum.py overlay/spiral.py overlay/wire/codec.py \
          overlay/wire/frames.py dvms/model.py dvms/partition.py dvms/monitor.py dvms/workload.py dvms/solver.py \
          dvms/isp_net.py discovery/ve/placement.py discovery/ve/spec.py discovery/ve/transaction.py \
          discovery/ve/moves.py discovery/ve/failovers.py discovery/ve/snapshotting.py discovery/ve/world.py \
           discovery/ve/records.py discovery/ve/creating.py discovery/ve/protection.py images/pulling.py \
           discovery/testbed/plan.py discovery/testbed/relay.py agents/host/restart_budget.py \
           discovery/ha/lease.py discovery/ha/watch.py discovery/ve/shipped.py discovery/ve/rebuilding.py \
           discovery/ve/takeover.py discovery/yamlfields.py discovery/campaign/plan.py discovery/campaign/results.py \
           discovery/campaign/spec.py
# Everything: typed, non-strict (pyproject's [tool.mypy]).
PROJECT := vivaldi overlay dvms images agents discovery benchmarks

$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory deps
	@[ -x $(PY) ] || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	@touch $@

deps:  ## Debian packages: what libvirt-python builds against, QEMU and libvirtd for real guests, rsync (the shipped-snapshot benchmark's baseline), iproute2, dnsmasq, nftables and udhcpc (VE networks and their tests); only if missing
	@missing=$$(for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@# libvirt's QEMU driver looks this account up even when QEMU runs as root; Debian creates it only
	@# in libvirt-daemon-system, which would also pull in systemd.
	@getent group libvirt-qemu >/dev/null || $(SUDO) groupadd --system libvirt-qemu
	@getent passwd libvirt-qemu >/dev/null || $(SUDO) useradd --system --gid libvirt-qemu --no-create-home \
	  --home-dir /var/lib/libvirt --shell /usr/sbin/nologin libvirt-qemu

demo: $(STAMP)  ## 12 agents on 4 sites, VEs created through different nodes
	@PATH="$(CURDIR)/$(VENV)/bin:$$PATH" ./scripts/demo.sh

demo-qemu: $(STAMP)  ## 3 agents running real tiny QEMU guests: live relocation, snapshot/restore
	@PATH="$(CURDIR)/$(VENV)/bin:$$PATH" ./scripts/demo-qemu.sh

test: $(STAMP) lint typecheck  ## the whole suite: unit, integration and fault tests
	$(VENV)/bin/pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy --strict $(CORES)
	$(VENV)/bin/mypy $(PROJECT)

bench: $(STAMP)  ## 200 VE creations through random agents of a 12-node cluster
	$(PY) benchmarks/ve_create.py --nodes 12 --sites 4 --ves 200 --plot docs/ve_create.png

clean:
	rm -rf $(VENV) demo-cluster demo-qemu
