"""An in-memory world for the VE transaction cores (`discovery.ve.creating`, `discovery.ve.moves`,
`discovery.ve.failovers`, `discovery.ve.rebuilding`, `discovery.ve.snapshotting`): hosts that hold domains,
reservations and standby copies, one VE record in a directory with its index entry, and which of them answer. It
performs a core's actions as `discovery.ve.driver` does over RPC, with the hosts' semantics (`agents.host`)
reduced to what the transactions rely on, and checks after every event what must always hold: no domain runs at
two places, and none of a VE that exists (not `creating`) is lost (held nowhere).

Faults: a name in `down` does not answer (a call has no effect), nor does one call with
`perform(..., fault="unreachable")`; `fault="lost"` applies a call and loses its answer; `"timeout"` /
`"late"` time an action with a limit out, before or after it took effect. A crash of a host is
`crash(node)`: down, its running guests gone (a host that comes back holds its domains off);
`lapse()` lets every reservation lapse. The calls of a `CallHosts` take one fault each: by their labels,
or all the same one.

For the tests (tests/unit/test_ve_*.py), as `dvms.isp_net` is for `dvms.partition`; it must stay free of
I/O so hypothesis can run thousands of schedules a second.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from discovery.ve.records import Slot, VERecord, VEState
from discovery.ve.spec import DEFAULT_IMAGE, VESpec, VMSpec
from discovery.ve.transaction import (
    Action,
    AddToIndex,
    Begun,
    Beside,
    CallHost,
    CallHosts,
    Candidate,
    CandidatesFound,
    ClaimRecord,
    Continued,
    Core,
    DeleteRecord,
    DirectoryFailed,
    Done,
    FindCandidates,
    HostAnswered,
    HostFailed,
    HostsAnswered,
    Indexed,
    Join,
    Observation,
    PauseForTest,
    Probe,
    Probed,
    ReadRecord,
    RecordRead,
    RecordWritten,
    Refuse,
    RemoveFromIndex,
    SearchFailed,
    TimedOut,
    WriteRecord,
)

DIRECTORY = "directory"
ROOM = {"vcpus": 16, "memory_mb": 65536, "disk_gb": 100}
Fault = str | Mapping[str, str | None] | None
"""How an action fails (module docstring): one fault, or faults by label (of the action, or of each call of a
`CallHosts`; one fault applies to all of its calls)."""


@dataclass
class Host:
    """What a node holds: domains (name -> running, paused or shutoff), reservations (token -> domain),
    standby copies, stored snapshot tags; where it is, the room it reports, whether the spiral search finds
    it (`near`; else only a search of every member does)."""

    domains: dict[str, str] = field(default_factory=dict)
    standbys: set[str] = field(default_factory=set)
    snapshots: dict[str, dict[str, str]] = field(default_factory=dict)
    """Domain -> its stored snapshots: tag -> the state a restore brings back."""
    backend: str = "test"
    live: bool = False  # has its own libvirtd: may migrate live
    reserved: dict[str, str] = field(default_factory=dict)
    site: str = "rennes"
    free: Mapping[str, int] = field(default_factory=lambda: dict(ROOM))
    near: bool = True
    images: set[str] = field(default_factory=set)
    """The images it holds (`holds_image` of the candidates it appears as)."""

    @property
    def migration_uri(self) -> str | None:
        return f"migrate://{id(self)}" if self.live else None


class HostError(Exception):
    pass


@dataclass
class World:
    hosts: dict[str, Host]
    record: VERecord | None
    addrs: dict[str, str] = field(default_factory=dict)
    index: dict[str, str] = field(default_factory=dict)
    """The directory's index: VE name -> the uid of the incarnation its entry lists."""
    down: set[str] = field(default_factory=set)
    conditional: bool = False
    """Writes as compare-and-set: one after a version other than the record's fails (a conflict). Without,
    the last write wins whatever its writer read (the records bound to Kademlia, whose writes are versioned but
    not conditional: concurrent writes may lose one another)."""
    version: int = 1
    seen: dict[Any, int] = field(default_factory=dict)
    """The version each writer last read or wrote (as the driver's `Record`), by the `who` of `perform`."""
    beside: dict[Any, Observation] = field(default_factory=dict)
    """What the action a writer started `Beside` led to (it is performed at once), until it joins."""
    trace: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    def addr(self, node: str) -> str:
        return self.addrs.get(node, f"{node}:1")

    # -- performing actions ------------------------------------------------------------------------

    def perform(self, action: Action, fault: Fault = None, who: Any = None) -> Observation:
        """Perform `action` as the driver would, for the writer `who`; `fault`: None, "unreachable" (not
        done), "lost" (done, answer lost), "timeout" (not done, timed out), "late" (done, timed out); or one of
        those by label (for a `CallHosts`, of each call). A name in `down` answers nothing."""
        self.trace.append(label(action))
        if isinstance(action, CallHosts):
            observation: Observation = HostsAnswered(tuple(self._call_one(c, fault) for c in action.calls))
        else:
            observation = self._perform(action, fault.get(label(action)) if isinstance(fault, Mapping) else fault, who)
        self.check()
        return observation

    def _call_one(self, call: CallHost, fault: Fault) -> HostAnswered | HostFailed:
        answer = self._call(call, fault.get(label(call)) if isinstance(fault, Mapping) else fault)
        assert isinstance(answer, (HostAnswered, HostFailed)), "the calls of a CallHosts run without a limit"
        return answer

    def _perform(self, action: Action, fault: str | None, who: Any) -> Observation:
        match action:
            case CallHost():
                return self._call(action, fault)
            case FindCandidates():
                return self._candidates(action, fault)
            case Probe():
                if action.node in self.down or fault is not None:
                    return Probed(action.node, None, reason=f"{action.node} cannot be reached")
                held = self.hosts[action.node].domains.get(action.domain)
                return Probed(action.node, held is not None, self._info(action.node, action.domain) if held else None)
            case ReadRecord():
                if DIRECTORY in self.down or fault is not None:
                    return DirectoryFailed("no replica answered")
                self.seen[who] = self.version
                return RecordRead(self.record)
            case WriteRecord() | DeleteRecord():
                return self._write(action.value if isinstance(action, WriteRecord) else None, fault, who)
            case ClaimRecord():
                if DIRECTORY in self.down or fault in ("unreachable", "timeout"):
                    return DirectoryFailed("no replica answered")
                if self.record is not None:
                    return RecordRead(self.record)
                self.seen[who] = self.version  # after the newest record read: none, or a tombstone
                return self._write(action.value, fault, who)
            case AddToIndex() | RemoveFromIndex():
                if DIRECTORY in self.down or fault in ("unreachable", "timeout"):
                    return DirectoryFailed("index bucket 've-index/03' could not be read")
                if isinstance(action, AddToIndex):
                    self.index[action.name] = action.uid
                elif self.index.get(action.name) == action.uid:
                    del self.index[action.name]
                return DirectoryFailed("index bucket 've-index/03' write reached 1 of 3 replicas") if fault \
                    else Indexed()
            case Beside():
                self.beside[who] = self._perform(action.action, fault, who)
                return Begun()
            case Join():
                return self.beside.pop(who)
            case PauseForTest():
                return TimedOut() if fault in ("timeout", "late") and action.within is not None else Continued()
        raise TypeError(action)

    def _write(self, value: VERecord | None, fault: str | None, who: Any) -> Observation:
        """Write `value` as the record (None: its tombstone)."""
        if DIRECTORY in self.down or fault in ("unreachable", "timeout"):
            return DirectoryFailed("write reached 0 of 3 replicas")
        if self.conditional and self.seen.setdefault(who, self.version) != self.version:
            return DirectoryFailed(f"the record changed since version {self.seen[who]}", "conflict")
        self.record = value
        self.version += 1
        if fault:
            return DirectoryFailed("write reached 1 of 3 replicas")
        self.seen[who] = self.version
        return RecordWritten()

    def _candidates(self, search: FindCandidates, fault: str | None) -> Observation:
        """The live hosts the spiral finds (`near`), nearest (by name) first; with `everyone`, then the others,
        those down without their room."""
        if fault is not None:
            return SearchFailed("the spiral search failed")
        images = {vm.image for vm in search.spec.vms if vm.image != DEFAULT_IMAGE}
        hosts = sorted(self.hosts, key=lambda n: (not self.hosts[n].near, n))
        found = [n for n in hosts if n not in self.down and (self.hosts[n].near or search.everyone)]
        found += [n for n in hosts if n in self.down and search.everyone]
        found.sort(key=lambda n: not images <= self.hosts[n].images)  # holders of the images first, as the agent
        return CandidatesFound(tuple(Candidate(n, self.addr(n), self.hosts[n].site, float(rank), "spiral",
                                               None if n in self.down else self.hosts[n].free,
                                               images <= self.hosts[n].images)
                                     for rank, n in enumerate(found)))

    def _call(self, call: CallHost, fault: str | None) -> Observation:
        if call.node in self.down or fault == "unreachable":
            return TimedOut() if call.within is not None and fault == "timeout" else \
                HostFailed(call.node, f"{call.node}: unreachable")
        if fault == "timeout" and call.within is not None:
            return TimedOut()
        try:
            answer = self._effect(call)
        except HostError as err:
            return HostFailed(call.node, f"{call.node}: {err}")
        if fault in ("timeout", "late") and call.within is not None:
            return TimedOut()
        if fault is not None:
            return HostFailed(call.node, f"{call.node}: connection lost")
        return HostAnswered(call.node, answer)

    def _info(self, node: str, domain: str) -> dict[str, Any]:
        host = self.hosts[node]
        return {"state": host.domains[domain], "backend": host.backend, "live": host.live}

    def _effect(self, call: CallHost) -> Any:
        """What the host does (`agents.host.service`, `moves`, `standby`), in short."""
        host, args = self.hosts[call.node], call.args
        name = args.get("name", "")
        match call.method:
            case verb if verb.startswith("host.vm."):
                return self._vm(call.node, name, verb.removeprefix("host.vm."), args.get("state"))
            case "host.reserve":
                token = f"token-{call.node}-{name}"
                host.reserved[token] = name
                return {"token": token, "backend": host.backend, "migration_uri": host.migration_uri}
            case "host.release":
                host.reserved.pop(args["token"], None)
                return True
            case "host.incoming":
                return True
            case "host.prefetch":
                if args["token"] not in host.reserved:
                    raise HostError(f"reservation {args['token']} is unknown or expired")
                host.images.add(args["image"])
                return True
            case "host.export":
                self._holding(call.node, name)
                if args.get("freeze") and host.domains[name] == "running":
                    host.domains[name] = "paused"
                return {"xml": f"<domain>{name}</domain>", "snapshots": sorted(host.snapshots.get(name, ())),
                        **({"ship": {"image": "memory"}} if args.get("ship") else {})}
            case "host.migrate":
                self._holding(call.node, name)
                target = next(n for n, h in self.hosts.items() if h.migration_uri == args["uri"])
                self.hosts[target].domains[name] = host.domains.pop(name)
                self.hosts[target].snapshots[name] = host.snapshots.pop(name, {})
                return {}
            case "host.confirm":
                if args["token"] not in host.reserved:
                    raise HostError(f"reservation {args['token']} is unknown or expired")
                state = args.get("state", "running")
                host.domains[host.reserved.pop(args["token"])] = state
                return {"state": state}
            case "host.promote":
                if name not in host.domains:
                    if name not in host.standbys:
                        raise HostError(f"no standby of {name} on this node")
                    host.standbys.discard(name)
                host.domains[name] = args["state"]
                return {"state": args["state"]}
            case "host.snapshot":
                self._holding(call.node, name)
                host.snapshots.setdefault(name, {})[args["tag"]] = args.get("state") or host.domains[name]
                return {"tag": args["tag"]}
            case "host.restore":
                self._holding(call.node, name)
                if args["tag"] not in host.snapshots.get(name, {}):
                    raise HostError(f"no snapshot {args['tag']} of {name} on this node")
                host.domains[name] = host.snapshots[name][args["tag"]]
                return {"state": host.domains[name]}
            case "host.snapshot_delete":
                self._holding(call.node, name)
                return {"deleted": host.snapshots.get(name, {}).pop(args["tag"], None) is not None}
            case "host.unstandby":
                host.standbys.discard(name)
                return True
        raise HostError(f"unknown method {call.method}")

    def _vm(self, node: str, name: str, action: str, state: str | None) -> Any:
        host = self.hosts[node]
        if name not in host.domains:
            if action in ("undefine", "destroy"):
                return None  # already gone: idempotent
            raise HostError(f"no VM {name} on this node")
        if action == "undefine":
            del host.domains[name]
            host.snapshots.pop(name, None)
            return None
        if action == "info":
            return self._info(node, name)
        new = {"settle": state, "destroy": "shutoff", "suspend": "paused", "resume": "running",
               "start": "running", "stop": "shutoff"}[action]
        assert new is not None
        host.domains[name] = new
        return {"state": new}

    def _holding(self, node: str, name: str) -> None:
        if name not in self.hosts[node].domains:
            raise HostError(f"no VM {name} on this node")

    # -- faults ------------------------------------------------------------------------------------

    def lapse(self) -> None:
        """Every reservation not confirmed yet lapses (RESERVATION_TTL passed)."""
        for host in self.hosts.values():
            host.reserved.clear()

    def crash(self, node: str) -> None:
        """The node dies: it answers nothing, and its guests stop (it holds them off when it comes back)."""
        self.down.add(node)
        host = self.hosts[node]
        for name, state in host.domains.items():
            if state != "shutoff":
                host.domains[name] = "shutoff"

    # -- what must always hold ---------------------------------------------------------------------

    def holders(self, domain: str) -> dict[str, str]:
        """Where `domain` is defined, and in which state."""
        return {n: h.domains[domain] for n, h in sorted(self.hosts.items()) if domain in h.domains}

    def running(self, domain: str) -> list[str]:
        return [n for n, state in self.holders(domain).items() if state == "running"]

    def check(self) -> None:
        """After every event: no domain runs at two places, and every VM of a VE that exists (not `creating`)
        is held by a node the record names for it: as a domain by its host or the target of the move or
        failover under way, or as a standby copy (which a failover may promote) by a node listed as keeping
        one or a failover's target."""
        if self.record is None:
            return
        for vm, slot in self.record.placement.items():
            domain = f"{self.record.name}:{vm}"
            if len(self.running(domain)) > 1:
                self.violations.append(f"{domain} runs at {self.running(domain)} after {self.trace[-1:]}")
            if self.record.state == "creating":
                continue
            named = slot.named()
            copies = [e.node for e in self.record.standbys_of(vm)]
            copies += [slot.failing_over.node] if slot.failing_over is not None else []
            if not any(domain in self.hosts[n].domains for n in named if n in self.hosts) and \
                    not any(domain in self.hosts[n].standbys for n in copies if n in self.hosts):
                self.violations.append(f"{domain} is held by none of {named} after {self.trace[-1:]}: "
                                       f"{self.holders(domain)}")


def run(core: Core, world: World, faults: Mapping[str, str] | None = None, tick: float = 1.0) -> Action:
    """Run `core` to its end on `world`, the clock advancing `tick` per action; `faults`: the fault of an
    action (or of a call of a `CallHosts`) by its label, `#n` for its n-th time (`confirm dst`, `write #2`).
    Returns the final action."""
    faults, seen, now = faults or {}, dict[str, int](), 0.0

    def fault_of(name: str) -> str | None:
        seen[name] = seen.get(name, 0) + 1
        return faults.get(name if seen[name] == 1 else f"{name} #{seen[name]}")

    world.seen[core] = world.version  # it was built from the record as it is
    action = core.start(now)
    while not isinstance(action, (Done, Refuse)):
        fault: Fault = {label(c): fault_of(label(c)) for c in action.calls} if isinstance(action, CallHosts) \
            else fault_of(label(action))
        observation = world.perform(action, fault, core)
        now += tick
        action = core.on(observation, now)
    return action


Turn = tuple[int, str | None, str | None]
"""One step of an interleaving: which actor acts (an index into those still at work), whose reachability
flips first (a node, `DIRECTORY`, or None), and the fault of that action."""


def coordinate_then_interleave(world: World, coordinator: Core, action: Action, working: Callable[[Core], bool],
                               crash: tuple[int, bool] | None, faults: Sequence[Fault], others: int,
                               steps: Sequence[Turn], deaths: Sequence[int], make: Callable[[World], Core | None],
                               ) -> tuple[Action, bool, dict[int, Action]]:
    """The interleaving properties' opening: the coordinator runs its first steps (while `working(core)`),
    each fed the answer `faults[i]`, and crashes at step `crash[0]` if given (`crash[1]`: its action was
    done, but nobody heard); then it and `others` recoverers act in the order `steps` draws (`interleave`).
    Returns what the coordinator ended with, whether it crashed, and how every actor ended."""
    now, i, crashed = 0.0, 0, False
    while not isinstance(action, (Done, Refuse)) and working(coordinator):
        if crash is not None and crash[0] == i:
            if crash[1]:
                world.perform(action, "lost", 0)  # done, and nobody heard
            crashed = True
            break
        fault = faults[i] if i < len(faults) else None
        i, now = i + 1, now + 1.0
        action = coordinator.on(world.perform(action, fault, 0), now)
    actors: dict[int, tuple[Core | None, Action | None]] = {k: (None, None) for k in range(1, others + 1)}
    if not crashed and not isinstance(action, (Done, Refuse)):
        actors[0] = (coordinator, action)
    ended = interleave(world, actors, steps, deaths, make, now)
    return ended.get(0, action), crashed, ended


def interleave(world: World, actors: dict[int, tuple[Core | None, Action | None]], steps: Sequence[Turn],
               deaths: Sequence[int], make: Callable[[World], Core | None], now: float = 0.0) -> dict[int, Action]:
    """Run `actors` (id -> (core, its next action), or (None, None) for a recoverer not started yet) one
    action at a time in the order `steps` draws; then, everyone answering, those still at work in turn to
    their end. A recoverer starts by reading the record (`make(world)`: its core, or None if the record
    holds nothing to recover; it waits while the directory is down); actor k > 0 dies at its `deaths[k-1]`-th
    action. Each actor writes as `who` = its id. Returns how each ended: its last action, `Refuse("crashed")`
    for those that died."""
    ended: dict[int, Action] = {}
    counts = dict.fromkeys(actors, 0)
    tail: list[Turn] = [(k, None, None) for k in range(200 * max(len(actors), 1))]
    for n, (pick, flip, fault) in enumerate([*steps, *tail]):
        if n == len(steps):
            world.down.clear()
        if flip is not None:
            world.down ^= {flip}
        running = [k for k in sorted(actors) if k not in ended]
        if not running:
            break
        who = running[pick % len(running)]
        core, action = actors[who]
        if core is None:
            if DIRECTORY in world.down:
                continue
            core = make(world)
            if core is None:
                ended[who] = Done(None)
                continue
            world.seen[who] = world.version
            action = core.start(now)
        else:
            assert action is not None
            if who and counts[who] == deaths[who - 1]:
                ended[who] = Refuse("crashed")
                continue
            counts[who] += 1
            now += 1.0
            action = core.on(world.perform(action, fault, who), now)
        actors[who] = (core, action)
        if isinstance(action, (Done, Refuse)):
            ended[who] = action
    assert set(ended) == set(actors), "an actor did not end"
    return ended


def label(action: Action) -> str:
    """How a trace names an action: `vm settle dst`, `confirm dst`, `confirm n1 + confirm n2` (calls at once),
    `probe src`, `read`, `write`, `claim`, `delete`, `index`, `unindex`, `search`, `search all`, `pause prepared`."""
    match action:
        case CallHost(method=verb) if verb.startswith("host.vm."):
            return f"vm {verb.removeprefix('host.vm.')} {action.node}"
        case CallHost():
            return f"{action.method.removeprefix('host.')} {action.node}"
        case CallHosts(calls=calls):
            return " + ".join(label(c) for c in calls)
        case Probe():
            return f"probe {action.node}"
        case FindCandidates(everyone=everyone):
            return "search all" if everyone else "search"
        case PauseForTest():
            return f"pause {action.point}"
        case Beside():
            return label(action.action)
    return NAMES.get(type(action), type(action).__name__)


NAMES: dict[type, str] = {ReadRecord: "read", WriteRecord: "write", ClaimRecord: "claim", DeleteRecord: "delete",
                          AddToIndex: "index", RemoveFromIndex: "unindex", Join: "join"}


def record_of(name: str, placement: Mapping[str, Slot], state: VEState = "running", **more: Any) -> VERecord:
    """A record of VE `name` whose VMs (one vCPU and 256 MiB each) are at `placement`; `more`: its other fields."""
    spec = VESpec(name, tuple(VMSpec(vm, 1, 256) for vm in placement))
    return VERecord(name, spec, "alice", state, dict(placement), "n0", 0.0, **more)
