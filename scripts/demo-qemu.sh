#!/usr/bin/env bash
# Real guests: 3 agents on 2 sites, each with its own libvirtd (private mount namespace), running tiny
# QEMU guests that write a heartbeat counter to their disk every second. Live relocation, snapshots.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${DEMO_DIR:-demo-qemu}

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run()  { printf '$ %s\n' "$*"; "$@"; }
console() { tail -n 1 "$DIR/$1/data/libvirtd/guests/tiny-pair--$2.log"; }
disk() { python -c "from images.tinyguest import read_heartbeat as r; print(r('$DIR/$1/data/libvirtd/guests/tiny-pair--$2.qcow2'))"; }
where() { discovery ve locate tiny-pair --json | python3 -c "import json,sys; print(json.load(sys.stdin)['vms']['$1']['node'])"; }

if [ -f "$DIR/cluster.json" ]; then discovery cluster down --dir "$DIR" >/dev/null 2>&1 || true; rm -rf "$DIR"; fi
trap 'discovery cluster down --dir "$DIR" >/dev/null 2>&1 || true' EXIT

step "Start 3 agents with real guests (builds the tiny guest once; KVM only if a smoke boot passes, else TCG)"
run discovery cluster up --nodes 3 --sites 2 --hypervisor qemu --dir "$DIR"
run discovery --agent node1 status

step "Two 128 MiB guests, never on one node, over 2 sites"
run discovery --agent node3 ve create examples/tiny-pair.yaml
sleep 8
A=$(where a)
echo "a runs on $A; its console says: $(console "$A" a)"

step "Suspend: the heartbeat stops; resume: it goes on"
run discovery --agent node2 ve suspend tiny-pair
echo "paused at: $(console "$A" a)"; sleep 3; echo "3 s later: $(console "$A" a)"
run discovery --agent node2 ve resume tiny-pair
sleep 3; echo "resumed:   $(console "$A" a)"

step "Live relocation of a to the third node: libvirt peer-to-peer migration with incremental disk copy"
B=$(where b)
TARGET=$(for n in node1 node2 node3; do if [ "$n" != "$A" ] && [ "$n" != "$B" ]; then echo $n; fi; done)
run discovery --agent node1 ve relocate tiny-pair --vm a --to "$TARGET"
sleep 3
echo "a now runs on $TARGET; its console there goes on counting (no reboot): $(console "$TARGET" a)"

step "Snapshot of the suspended VE, let the counters move on, restore: the disk's counter comes back"
run discovery --agent node3 ve suspend tiny-pair
echo "heartbeat on a's disk: $(disk "$TARGET" a)"
run discovery --agent node3 ve snapshot tiny-pair --tag demo
run discovery --agent node3 ve resume tiny-pair
sleep 4; echo "4 s later, on a's disk: $(disk "$TARGET" a)"
run discovery --agent node2 ve restore tiny-pair demo
echo "after the restore (the VE is suspended, as at the snapshot), on a's disk: $(disk "$TARGET" a)"
run discovery --agent node2 ve resume tiny-pair

step "Destroy, then stop the cluster (its guests and daemons too)"
run discovery --agent node1 ve destroy tiny-pair
