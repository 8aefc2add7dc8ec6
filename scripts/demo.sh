#!/usr/bin/env bash
# The newcomer's tour: 12 agents on 4 sites, VEs created through different nodes, where they landed and why;
# placement constraints, suspend/resume, relocation to another site, snapshot and restore, DVMS relieving an
# overloaded node, the records moved between overlays, failover by hand and by the HA watchers.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${DEMO_DIR:-demo-cluster}

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run()  { printf '$ %s\n' "$*"; "$@"; }

if [ -f "$DIR/cluster.json" ]; then discovery cluster down --dir "$DIR" >/dev/null 2>&1 || true; rm -rf "$DIR"; fi

step "Start 12 agents (separate processes, mutual TLS, emulated WAN latency between 4 sites)"
run discovery cluster up --nodes 12 --sites 4 --dir "$DIR"

step "Every agent knows every member (SWIM-style gossip); RTTs are measured, not configured"
run discovery --agent node7 members

step "The spiral search finds the nodes nearest to an agent, asking a few nodes instead of everyone"
run discovery --agent node7 spiral --count 4

step "Disk images: chunked where the file is, stored once; a next version stores only what changed"
IMG="$DIR/images"; mkdir -p "$IMG/v1"; cp -r /usr/share/common-licenses "$IMG/v1/"
cp -r "$IMG/v1" "$IMG/v2"; cp /usr/share/common-licenses/GPL-3 "$IMG/v2/added-in-v2"
for v in v1 v2; do   # two small ext4 filesystems, the second with one file more
  mke2fs -q -t ext4 -U 6a1d6c3e-0000-4000-8000-000000000001 -E hash_seed=6a1d6c3e-0000-4000-8000-000000000001 \
    -d "$IMG/$v" "$IMG/shop-disk-$v.raw" 64M
done
run discovery --agent node1 image import "$IMG/shop-disk-v1.raw" --name shop-disk
run discovery --agent node1 image import "$IMG/shop-disk-v2.raw" --name shop-disk:2
run discovery --agent node2 image replicate shop-disk --copies 3   # 3 holders over at least 2 sites
run discovery image list

step "Create VEs through different agents: each VM goes to the nearest node with room (found by the spiral)"
run discovery --agent node1 ve create examples/web-shop.yaml
run discovery --agent node6 ve create examples/analytics.yaml
run discovery --agent node11 ve create examples/ci-runner.yaml

step "A request that cannot be placed is refused, with the reason"
run discovery --agent node3 ve create examples/too-big.yaml || true

step "Any agent lists every VE: the directory is a DHT replicated on 3 ring successors"
run discovery --agent node9 ve list

step "Stop and start a VE through yet another agent"
run discovery --agent node12 ve stop ci-runner
run discovery --agent node4 ve show ci-runner
run discovery --agent node2 ve start ci-runner

step "Placement constraints: three replicas on three different nodes over at least two sites (created through node10)"
run tail -n 3 examples/replicated-store.yaml
run discovery --agent node10 ve create examples/replicated-store.yaml
run discovery --agent node5 ve locate replicated-store

step "A constraint that cannot be met is refused, naming it: a 4-member quorum, one member per node, in a 3-node site"
run cat examples/quorum.yaml
run discovery --agent node7 ve create examples/quorum.yaml || true

step "Suspend (VMs paused, memory kept) and resume, each through another agent"
run discovery --agent node8 ve suspend web-shop
run discovery --agent node3 ve show web-shop
run discovery --agent node12 ve resume web-shop

step "Relocate one VM to another site: placement picks the node there; the domain and its state travel"
run discovery --agent node6 ve relocate web-shop --vm db --site nancy
run discovery --agent node9 ve locate web-shop

step "Snapshot every VM at once (all paused, snapshotted, resumed), change the VE, restore it"
run discovery --agent node2 ve snapshot web-shop --tag before-upgrade
run discovery --agent node11 ve snapshots web-shop
run discovery --agent node4 ve stop web-shop
run discovery --agent node10 ve show web-shop
run discovery --agent node1 ve restore web-shop before-upgrade
run discovery --agent node7 ve show web-shop

step "DVMS: a node too small for its VMs' demand gets help from its nearest nodes, which take VMs, constraints kept"
HOT=$(discovery ve locate replicated-store --json | python3 -c "import json,sys; print(json.load(sys.stdin)['vms']['replica-1']['node'])")
run discovery --agent "$HOT" dvms capacity 150              # DVMS now counts 1.5 vCPUs on $HOT ...
run discovery dvms load replicated-store:replica-1 200      # ... and replica-1 keeps 2 vCPUs busy: overload
run discovery --agent "$HOT" dvms status                    # overloaded: a partition grows from $HOT
resolved() { discovery --agent "$HOT" dvms status --json | python3 -c \
  "import json,sys; s=json.load(sys.stdin); sys.exit(not (s['load']['state'] == 'normal' and 'solved' in s['ended'].values()))"; }
for _ in $(seq 30); do resolved && break; sleep 1; done
run discovery --agent "$HOT" dvms status --events 8
resolved || { echo "error: the overload of $HOT was not resolved within 30 s" >&2; exit 1; }
echo "overload of $HOT resolved: see the migrated event; the replicas are still on 3 nodes over 2 sites:"
run discovery --agent node9 ve locate replicated-store

step "Move every agent's records (the VE directory too) from Chord to Kademlia while they run; nothing is lost"
run discovery --agent node5 overlay bind kademlia
run discovery --agent node10 ve list
run discovery --agent node8 overlay bind chord

step "Standby copies in another site; the host of a VM dies (kill -9); failover brings the VM up on its copy"
run discovery --agent node3 ve replicate ci-runner --copies 1
HOST=$(discovery --agent node2 ve locate ci-runner --json | python3 -c "import json,sys; print(sorted(json.load(sys.stdin)['vms'].values(), key=lambda v: v['node'])[0]['node'])")
PID=$(python3 -c "import json; print(next(n['pid'] for n in json.load(open('$DIR/cluster.json'))['nodes'] if n['name'] == '$HOST'))")
echo "killing $HOST (pid $PID)"
run kill -9 "$PID"
run discovery --agent node9 ve failover ci-runner
run discovery --agent node12 ve show ci-runner

step "HA with no operator: a protected VE's host loses power; its watchers fail the VM over by themselves"
other() { python3 -c "import json,sys; print(next(n['name'] for n in json.load(open('$DIR/cluster.json'))['nodes'] if n['name'] not in sys.argv[1:]))" "$@"; }
VIA=$(other "$HOST")
run discovery --agent "$VIA" ve create examples/guarded-db.yaml
GHOST=$(discovery --agent "$VIA" ve locate guarded-db --json | python3 -c "import json,sys; print(json.load(sys.stdin)['vms']['db']['node'])")
ASK=$(other "$HOST" "$GHOST")
lists() { discovery --agent "$ASK" ha lease "$GHOST" --json 2>/dev/null | grep -q guarded-db; }
for _ in $(seq 30); do lists && break; sleep 1; done
run discovery --agent "$ASK" ha lease "$GHOST"      # the host's lease lists the VE: it runs it only while renewed
run discovery cluster kill "$GHOST" --dir "$DIR"    # power loss: kill -9, nothing typed after this
START=$(date +%s.%N)
moved() { [ "$(discovery --agent "$ASK" ve locate guarded-db --json 2>/dev/null | python3 -c "import json,sys; print(json.load(sys.stdin)['vms']['db']['node'])" 2>/dev/null)" != "$GHOST" ]; }
for _ in $(seq 120); do moved && break; sleep 0.5; done
moved || { echo "error: guarded-db was not recovered within 60 s" >&2; exit 1; }
echo "guarded-db recovered $(python3 -c "print(round($(date +%s.%N) - $START, 1))") s after the kill, with no command"
run discovery --agent "$ASK" ve show guarded-db       # on its former copy, why, and a new copy being made
run discovery --agent "$ASK" ha lease "$GHOST"        # revoked: back, the host runs nothing stale
run discovery --agent "$ASK" ha status --all
run discovery cluster start "$GHOST" --dir "$DIR"

cat <<EOT

Explore:  discovery --agent node5 ve show web-shop     (any node, any VE; add --json)
          discovery cluster status --dir $DIR          (ring successor of each agent)
          discovery --agent node3 status                (one agent's own view)
          discovery dvms status --all --events 5        (DVMS on every agent)
          tail $DIR/node1/agent.log
Real guests: make demo-qemu                             (3 agents, tiny QEMU guests, live relocation)
Stop:     discovery cluster down --dir $DIR
          (the discovery command lives in .venv/bin; 'source .venv/bin/activate' first)
EOT
