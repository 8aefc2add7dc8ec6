"""`discovery ve`: virtual environments, from any agent."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from discovery.cli.app import JsonOpt, console, emit, fail, make_table, rpc

ve_app = typer.Typer(no_args_is_help=True, help="Virtual environments, from any agent.")


def ve_table(ves: list[dict[str, Any]]) -> Table:
    """One row per VM; the live domain state appears when the agent looked it up (`ve show`), and the
    standby copies (with whether their node holds them, for `ve show`) when the VE has some."""
    live = any("domain_state" in slot for ve in ves for slot in ve["placement"].values())
    copies = any(ve.get("replicas") for ve in ves)
    rows = []
    for ve in ves:
        for vm, slot in sorted(ve["placement"].items()):
            row = [ve["name"], ve["state"], vm, slot["node"], slot["site"]]
            why = slot["why"]
            if slot.get("moving_to"):  # an interrupted relocation, settled by the next command on the VE
                why = f"moving to {slot['moving_to']['node']} ({slot['moving_to']['phase']}); {why}"
            if slot.get("failing_over"):  # an interrupted failover, likewise
                why = f"failing over to {slot['failing_over']['node']}; {why}"
            if slot.get("rebuilding"):  # an interrupted rebuild, likewise
                why = f"rebuilding on {slot['rebuilding']['node']}; {why}"
            standbys = ", ".join(e["node"] + (f" ({e['standby']})" if e.get("standby", "held") != "held" else "")
                                 for e in ve.get("replicas", {}).get(vm, []))
            rows.append(row + ([slot.get("domain_state")] if live else []) + ([standbys] if copies else []) + [why])
    columns = (["ve", "state", "vm", "node", "site"] + (["domain"] if live else [])
               + (["standby copies"] if copies else []) + ["why there"])
    return make_table(columns, rows)


def protection_table(ve: dict[str, Any]) -> Table:
    """`ve show`: each VM's protection (`discovery.ve.protection`), its copies with their age, its last snapshot."""
    now = time.time()
    rows = []
    for vm, p in sorted(ve["protection"].items()):
        copies = ", ".join(f"{c['node']} ({_copy_age(c)}{'' if c['standby'] == 'held' else ', ' + c['standby']})"
                           for c in p.get("copies", []))
        last, shipped = p.get("last_snapshot"), p.get("last_shipped")
        rows.append([vm, p["status"], policy_text(p["policy"]), copies or None,
                     f"{_age(now - last)} ago" if last is not None else None,
                     f"{shipped['image']} ({_age(now - shipped['time'])} ago)" if shipped else None, p.get("why")])
    return make_table(["vm", "protection", "ha policy", "standby copies", "last snapshot", "last shipped", "why"],
                      rows)


def nic_table(ve: dict[str, Any]) -> Table:
    """`ve show`: each VM's interfaces: network, MAC, IPv4 address, the network's subnet and VXLAN id, and what of
    the outside reaches it: `nat` (its network's uplink), and the ports its host forwards to its first NIC
    (`host:port/protocol -> port`, where a client outside connects)."""
    networks, spec = ve.get("networks", {}), ve.get("spec", {})
    nat = {network["name"] for network in spec.get("networks", []) if network.get("nat")}
    rows = []
    for vm, nics in sorted(ve["nics"].items()):
        host = ve["placement"].get(vm, {}).get("addr", "").rpartition(":")[0].strip("[]") or "?"  # of host:port
        for index, nic in enumerate(nics):
            outside = ["nat"] if nic["network"] in nat else []
            if index == 0:
                outside += [f"{host}:{e['host_port']}/{e.get('protocol', 'tcp')} -> {e['port']}"
                            for e in spec.get("expose", []) if e["vm"] == vm]
            rows.append([vm, nic["network"], nic["mac"], nic["address"], networks.get(nic["network"], {}).get("subnet"),
                         networks.get(nic["network"], {}).get("vni"), ", ".join(outside) or None])
    return make_table(["vm", "network", "mac", "address", "subnet", "vni", "outside"], rows)


def policy_text(ha: dict[str, Any]) -> str:
    """An HA policy in a few words: `standby, 2 copies per VM, priority 5`."""
    from discovery.ve.spec import format_duration  # only for the commands that print a policy

    mode = ha.get("mode", "none")
    words = [mode]
    if mode == "standby":
        words.append(f"{ha['copies']} cop{'y' if ha['copies'] == 1 else 'ies'} per VM")
    if ha.get("snapshot_every") is not None:
        words.append(f"a snapshot every {format_duration(ha['snapshot_every'])}, {ha['keep']} kept")
    if mode == "standby":
        replication = ha.get("replication", "async")
        words.append("no replication" if replication == "off" else f"{replication} replication"
                     + (f" at {ha['bandwidth']} MiB/s" if ha.get("bandwidth") else ""))
    if ha.get("priority"):
        words.append(f"priority {ha['priority']}")
    return ", ".join(words)


def _copy_age(copy: dict[str, Any]) -> str:
    """How fresh a standby copy is: its mirror's lag once ready, else its age (and the mirror's state)."""
    mirror = copy.get("mirror")
    if mirror == "ready":
        return f"mirrored, {copy['lag']:.1f} s behind"
    return f"{_age(copy['lag'])} old" + (f", mirror {mirror}" if mirror else "")


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.0f} {unit}"
    return f"{max(seconds, 0):.0f} s"


@ve_app.command("create")
def ve_create(spec_file: Path, as_json: JsonOpt = False) -> None:
    """Create and start the VE described by SPEC_FILE (YAML); with `ha: {mode: standby}`, its standby copies
    too (a VE whose copies cannot all be made is created all the same, and reported degraded)."""
    from discovery.ve.spec import SpecError, load_spec  # YAML: only for this command

    try:
        spec = load_spec(spec_file)
    except SpecError as err:
        raise fail(str(err)) from None
    ve = rpc("ve.create", {"spec": spec.to_dict()}, timeout=300 if spec.ha.copies else 60)
    emit(ve, as_json, ve_table([ve]))
    if not as_json and ve.get("shortfall"):
        print(f"warning: created, but not protected as its HA policy asks: {ve['shortfall']['why']}", file=sys.stderr)


@ve_app.command("list")
def ve_list(
    limit: Annotated[int, typer.Option(min=1, max=1000, help="At most this many VEs (one page).")] = 100,
    cursor: Annotated[str | None, typer.Option(help="Start after the previous page: its next cursor.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The VEs of the cluster (yours; every VE for an operator), a page at a time, from the directory's index.
    JSON: {"ves": [...], "next_cursor": C or null}."""
    page = rpc("ve.list", {"limit": limit, "cursor": cursor})
    emit(page, as_json, ve_table(page["ves"]))
    if not as_json and page["next_cursor"]:
        print(f"more: discovery ve list --cursor {page['next_cursor']}")


@ve_app.command("show")
def ve_show(name: str, as_json: JsonOpt = False) -> None:
    """One VE with the live state of each VM's domain, and each VM's protection: its HA policy, its standby
    copies and their age, its last snapshot, and whether it is protected, degraded (why) or unprotected."""
    ve = rpc("ve.show", {"name": name})
    emit(ve, as_json, ve_table([ve]))
    if not as_json:
        console.print(protection_table(ve))
        if ve.get("nics"):
            console.print(nic_table(ve))


@ve_app.command("locate")
def ve_locate(name: str, as_json: JsonOpt = False) -> None:
    """Which node hosts each VM of the VE, from the VE directory."""
    info = rpc("ve.locate", {"name": name})
    emit(info, as_json, make_table(["vm", "node", "site", "address", "standby copies"],
                                   [[vm, s["node"], s["site"], s["addr"],
                                     ", ".join(f"{r['node']} ({r['site']})" for r in s.get("replicas", []))]
                                    for vm, s in info["vms"].items()]))


@ve_app.command("relocate")
def ve_relocate(
    name: str,
    vm: Annotated[str | None, typer.Option("--vm", help="Move only this VM (default: every VM of the VE).")] = None,
    to: Annotated[str | None, typer.Option("--to", help="The node to move to.")] = None,
    site: Annotated[str | None, typer.Option("--site", help="The site to move to; placement picks the node.")] = None,
    method: Annotated[str, typer.Option(help="Real guests: auto (live where possible, else save/ship/restore), "
                                              "live, or ship.")] = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Move a VM (or the whole VE) to another node or site, keeping the VE's constraints; safe to retry."""
    if (to is None) == (site is None):
        print("error: give either --to NODE or --site SITE", file=sys.stderr)
        raise typer.Exit(2)
    ve = rpc("ve.relocate", {"name": name, "vm": vm, "to": to, "site": site, "method": method}, timeout=600)
    emit(ve, as_json, ve_table([ve]))
    if not as_json:
        how = {vm: ve["placement"][vm].get("transfer") for vm in ve["moved"]}
        moved = [f"{vm} ({t['how']}, {t['seconds']:.1f} s)" if t else vm for vm, t in how.items()]
        print(f"moved: {', '.join(moved)}" if moved else "nothing to move: already there")


@ve_app.command("snapshot")
def ve_snapshot(name: str, tag: Annotated[str | None, typer.Option("--tag", help="Default: snap-<UTC time>.")] = None,
                as_json: JsonOpt = False) -> None:
    """Snapshot every VM of the VE at once (running VMs are paused meanwhile)."""
    snap = rpc("ve.snapshot", {"name": name, "tag": tag}, timeout=300)
    emit(snap, as_json, make_table(["ve", "tag", "vm", "node", "state"],
                                   [[snap["name"], snap["tag"], vm, s["node"], s["state"]]
                                    for vm, s in snap["vms"].items()]))


@ve_app.command("snapshots")
def ve_snapshots(name: str, as_json: JsonOpt = False) -> None:
    """The snapshots of the VE, oldest first (each VM's node is where it was when the snapshot was taken), then
    the shipped snapshots of each VM (images kept on other nodes), with their age and holders."""
    info = rpc("ve.snapshots", {"name": name})
    rows = [[s["tag"], time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["time"])), s["state"],
             ", ".join(f"{vm}@{v['node']} ({v['state']})" for vm, v in sorted(s["vms"].items()))]
            for s in info["snapshots"]]
    emit(info, as_json, make_table(["tag", "time", "ve state", "vms"], rows))
    shipped = info.get("shipped") or {}
    if shipped and not as_json:
        console.print(shipped_table([(vm, s) for vm, listed in sorted(shipped.items()) for s in listed]))


def shipped_table(shipped: list[tuple[str, dict[str, Any]]]) -> Table:
    """Shipped snapshots (VM, `ShippedImage`): tag, age, image, digest, holders per site."""
    now = time.time()
    rows = [[vm, s["image"].rpartition(":")[2], f"{_age(now - s['time'])} ago", s["image"], s["digest"][:16],
             ", ".join(f"{node} ({site})" for node, site in sorted(s["holders"].items())) or None]
            for vm, s in shipped]
    return make_table(["vm", "shipped", "age", "image", "digest", "holders"], rows)


@ve_app.command("ship")
def ve_ship(name: str, as_json: JsonOpt = False) -> None:
    """Ship a snapshot of every VM of the VE now: its disk as an image, on other nodes (only what changed since
    its last one travels); the policy's `keep` newest are kept."""
    done = rpc("ve.ship", {"name": name}, timeout=1800)
    rows = [[vm, v["shipped"]["image"], v["host"], ", ".join(f"{n}: {b:,} B" for n, b in sorted(v["sent"].items())),
             f"{v['paused']:.3f} s", f"{v['seconds']:.1f} s", ", ".join(v["pruned"]) or None]
            for vm, v in sorted(done["vms"].items())]
    emit(done, as_json, make_table(["vm", "image", "from", "sent", "paused", "took", "pruned"], rows))


@ve_app.command("restore-point")
def ve_restore_point(name: str, vm: str, tag: Annotated[str | None, typer.Option(help="Default: the newest.")] = None,
                     as_json: JsonOpt = False) -> None:
    """The shipped snapshot VM VM of the VE restarts from elsewhere once its host is gone (boot its image)."""
    found = rpc("ve.restore_point", {"name": name, "vm": vm, "tag": tag})
    emit(found, as_json, shipped_table([(vm, found)]))


@ve_app.command("restore")
def ve_restore(name: str, tag: str, as_json: JsonOpt = False) -> None:
    """Bring every VM of the VE back to snapshot TAG."""
    ve = rpc("ve.restore", {"name": name, "tag": tag}, timeout=300)
    emit(ve, as_json, make_table(["ve", "state", "restored"], [[ve["name"], ve["state"], tag]]))


@ve_app.command("snapshot-delete")
def ve_snapshot_delete(name: str, tag: str, as_json: JsonOpt = False) -> None:
    """Delete snapshot TAG of the VE from every VM's host (wherever the VM is now); safe to retry."""
    info = rpc("ve.snapshot_delete", {"name": name, "tag": tag}, timeout=300)
    left = ", ".join(s["tag"] for s in info["snapshots"]) or None
    emit(info, as_json, make_table(["ve", "deleted", "snapshots left"], [[info["name"], info["tag"], left]]))


@ve_app.command("replicate")
def ve_replicate(
    name: str,
    copies: Annotated[int, typer.Option("--copies", help="Standby copies per VM; 0 drops them all.")],
    as_json: JsonOpt = False,
) -> None:
    """Keep COPIES standby copies of each VM on other nodes, other sites first (again: refresh them)."""
    ve = rpc("ve.replicate", {"name": name, "copies": copies}, timeout=300)
    emit(ve, as_json, ve_table([ve]))
    if not as_json:
        _print_copies(ve)


@ve_app.command("ha")
def ve_ha(
    name: str,
    mode: Annotated[str, typer.Option("--mode", help="standby (copies on other nodes), restart (elsewhere, from "
                                                     "the image and the last snapshot) or none.")],
    copies: Annotated[int | None, typer.Option("--copies", help="standby: copies per VM (default 1).")] = None,
    snapshot_every: Annotated[str | None, typer.Option("--snapshot-every", help="restart: periodic snapshots, "
                                                                               "e.g. 30s, 5m, 1h.")] = None,
    keep: Annotated[int | None, typer.Option("--keep", help="restart: snapshots kept (default 3).")] = None,
    priority: Annotated[int | None, typer.Option("--priority", help="Higher is recovered first (default 0).")] = None,
    replication: Annotated[str | None, typer.Option("--replication", help="standby: a real guest's disk mirrored "
                                                    "to its first copy: async (default), sync or off.")] = None,
    bandwidth: Annotated[int | None, typer.Option("--bandwidth", help="standby: the mirror's cap, MiB/s.")] = None,
    max_lag: Annotated[str | None, typer.Option("--max-lag", help="standby: a mirror further behind shows the "
                                                "VM degraded (default 5s).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Set the VE's HA policy, as `ha:` in a spec: standby keeps copies of each VM (made now, other sites
    first); restart and none drop them. Refused, changing nothing, if the copies cannot be placed."""
    given = {"copies": copies, "snapshot_every": snapshot_every, "keep": keep, "priority": priority,
             "replication": replication, "bandwidth": bandwidth, "max_lag": max_lag}
    policy = {"mode": mode, **{key: value for key, value in given.items() if value is not None}}
    ve = rpc("ve.ha", {"name": name, "ha": policy}, timeout=300)
    emit(ve, as_json, ve_table([ve]))
    if not as_json:
        print(f"ha: {policy_text(ve['spec'].get('ha', {}))}")
        _print_copies(ve)


def _print_copies(ve: dict[str, Any]) -> None:
    for what, nodes in (("added", ve["added"]), ("dropped", ve["dropped"])):
        if nodes:
            print(f"{what}: " + "; ".join(f"{vm} on {', '.join(on)}" for vm, on in sorted(nodes.items())))


DownVmOpt = Annotated[str | None, typer.Option("--vm", help="Only this VM (default: every VM whose host is down).")]
AliveForceOpt = Annotated[bool, typer.Option("--force", help="Even if the host is alive: its copy is switched off "
                                                              "first.")]


@ve_app.command("failover")
def ve_failover(name: str, vm: DownVmOpt = None, force: AliveForceOpt = False, as_json: JsonOpt = False) -> None:
    """Bring the VMs whose host is down back up on their nearest standby copy, in the VE's state."""
    ve = rpc("ve.failover", {"name": name, "vm": vm, "force": force}, timeout=300)
    emit(ve, as_json, ve_table([ve]))
    if not as_json:
        print("failed over: " + ", ".join(f"{v} to {node}" for v, node in ve["failed_over"].items()))


@ve_app.command("rebuild")
def ve_rebuild(name: str, vm: DownVmOpt = None, force: AliveForceOpt = False, as_json: JsonOpt = False) -> None:
    """Make the VMs whose host is down again on other nodes, in the VE's state, booting their newest shipped
    snapshot, else their image on a fresh disk (a VM with a standby copy fails over instead: `ve failover`)."""
    ve = rpc("ve.rebuild", {"name": name, "vm": vm, "force": force}, timeout=900)
    emit(ve, as_json, ve_table([ve]))
    if not as_json:
        print("rebuilt: " + ", ".join(f"{v} on {node}" for v, node in ve["rebuilt"].items()))


@ve_app.command("stop")
def ve_stop(
    name: str,
    timeout: Annotated[float | None, typer.Option(
        "--timeout", help="Seconds each guest has to power off before it is forced (default 30, at most 600).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Force the VMs off at once.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Shut the VE's VMs down gracefully, each forced off after a timeout (or at once with --force)."""
    if force and timeout is not None:
        print("error: give --timeout or --force, not both", file=sys.stderr)
        raise typer.Exit(2)
    wait = 60 + (timeout or 30)  # all VMs stop at once (a lock per VM on each host), each within the timeout
    ve = rpc("ve.stop", {"name": name, "timeout": timeout, "force": force}, timeout=wait)
    emit(ve, as_json, make_table(["ve", "state"], [[ve["name"], ve["state"]]]))


def _lifecycle(verb: str) -> None:
    def command(name: str, as_json: JsonOpt = False) -> None:
        ve = rpc(f"ve.{verb}", {"name": name})
        emit(ve, as_json, make_table(["ve", "state"], [[ve["name"], ve["state"]]]))

    command.__doc__ = {"start": "Start every VM of the VE.", "suspend": "Pause every VM of the VE (memory kept).",
                       "resume": "Run the VE's paused VMs again.",
                       "destroy": "Remove the VE, its VMs and their standby copies."}[verb]
    ve_app.command(verb)(command)


for _verb in ("start", "suspend", "resume", "destroy"):
    _lifecycle(_verb)
