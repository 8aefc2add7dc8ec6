"""The node's hypervisor, driven through libvirt from pykka actors.

A libvirt connection is owned by one thread and every call on it blocks, so each connection lives
inside a `HypervisorActor` (a `pykka.ThreadingActor`): its thread opens the connection, runs the
requests sent to it one at a time, and closes it. Trio code talks to the actors through `Hypervisor`,
which calls their methods through pykka proxies and awaits the futures in worker threads (with a
limiter), so the event loop never blocks on libvirt.

`Hypervisor` owns a small pool of such actors: each request borrows an idle one for its length.
The embedded drivers get one connection (`test:///` is one in-memory host per connection,
`qemu:///embed` one driver per process); a node's own libvirtd gets several, so a live migration or
a managed save of one VM (seconds) does not hold back the short calls about the others. The pool
never orders requests: callers that need an order (one VM's operations) hold their own lock
(`agents.host.locks`).

The default backend is libvirt's embedded `test:///<node.xml>` driver: a real libvirt with an
in-memory host whose CPUs and memory come from `node.xml` (see `write_node_xml`), and no daemon. It
forgets every domain when the connection closes, does no capacity accounting and cannot migrate; the
agent handles those elsewhere. Real guests use the QEMU driver, either embedded in the agent
(`qemu:///embed?root=DIR`, no daemon, no migration) or the node's own libvirtd (`agents.hypervisor.libvirtd`),
which adds internal qcow2 snapshots, managed save and peer-to-peer live migration (the `snapshot*`,
`managed_save`, `restore_file` and `migrate` requests). Every operation here is idempotent, so
a caller may retry freely.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import time
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar
from uuid import NAMESPACE_URL, UUID, uuid5

import libvirt
import pykka
import trio

from agents.hypervisor import mirror
from agents.hypervisor.qemu_xml import open_embed

log = logging.getLogger(__name__)

# libvirt prints every error to stderr by default; we turn them all into HypervisorError instead.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def _answers_only(record: logging.LogRecord) -> bool:
    """pykka logs, with a traceback, every exception a proxy call hands back to its caller; a hypervisor's
    refusals (no such domain, a libvirt error) are answers that the caller reports, not actor failures."""
    exc = record.exc_info[1] if record.exc_info else None
    return not isinstance(exc, HypervisorError | libvirt.libvirtError)


logging.getLogger("pykka").addFilter(_answers_only)

_STATES = {
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running",  # running, but waiting on a resource
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
}
_CRASH_REASONS = (libvirt.VIR_DOMAIN_SHUTOFF_CRASHED, libvirt.VIR_DOMAIN_SHUTOFF_FAILED)
_UNDEFINE_FLAGS = libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
SETTLED = ("running", "paused", "shutoff")
"""The states `Hypervisor.settle` brings a domain to (what the agent persists as a VM's desired state)."""
DAEMON_CONNECTIONS = 4
"""Connections (actors) to a node's own libvirtd: long calls about one VM leave the others free."""
T = TypeVar("T")


class HypervisorError(Exception):
    """A hypervisor operation failed; the message is one line (libvirt's own, when it comes from libvirt)."""


def _message(err: libvirt.libvirtError) -> str:
    text = err.get_error_message() or str(err)
    return next((line.strip() for line in text.splitlines() if line.strip()), "unknown libvirt error")


def _translate(err: libvirt.libvirtError, prefix: str = "") -> HypervisorError:
    error = HypervisorError(prefix + _message(err))
    error.__cause__ = err
    return error


# -- XML -------------------------------------------------------------------------------------------


def write_node_xml(path: Path, vcpus: int, memory_mb: int) -> str:
    """Describe a host with `vcpus` CPUs and `memory_mb` MiB for the test driver; returns its URI.

    The URI is "test://" followed by the absolute path, percent-encoded where the path holds characters
    a URI cannot carry as they are (libvirt decodes them); an ordinary path comes out unchanged.
    """
    if vcpus < 1 or memory_mb < 1:
        raise ValueError(f"a node needs at least one vcpu and 1 MiB (got {vcpus} vcpus, {memory_mb} MiB)")
    node = ET.Element("node")
    cpu = ET.SubElement(node, "cpu")
    for tag, value in (("nodes", 1), ("sockets", 1), ("cores", vcpus), ("threads", 1), ("mhz", 2000),
                       ("model", "i686"), ("active", vcpus), ("total", vcpus)):
        ET.SubElement(cpu, tag).text = str(value)
    ET.SubElement(node, "memory").text = str(memory_mb * 1024)  # KiB
    ET.indent(node)
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(ET.tostring(node, encoding="unicode") + "\n")
    return "test://" + urllib.parse.quote(str(path))


def domain_xml(name: str, vcpus: int, memory_mb: int, uuid: str | None = None,
               domain_type: str = "test") -> str:
    """A minimal persistent domain. Without `uuid`, one is derived from `name`, so regenerating the XML of
    a domain (say, on a retried request) and defining it again is idempotent."""
    if not name:
        raise ValueError("a domain needs a name")
    if vcpus < 1 or memory_mb < 1:
        raise ValueError(f"a domain needs at least one vcpu and 1 MiB (got {vcpus} vcpus, {memory_mb} MiB)")
    domain = ET.Element("domain", type=domain_type)
    ET.SubElement(domain, "name").text = name
    domain_uuid = UUID(uuid) if uuid else uuid5(NAMESPACE_URL, f"discovery:{name}")
    ET.SubElement(domain, "uuid").text = str(domain_uuid)
    ET.SubElement(domain, "memory", unit="MiB").text = str(memory_mb)
    ET.SubElement(domain, "vcpu").text = str(vcpus)
    ET.SubElement(ET.SubElement(domain, "os"), "type").text = "hvm"
    return ET.tostring(domain, encoding="unicode")


# -- the actor -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostInfo:
    model: str
    vcpus: int
    memory_mb: int


@dataclass(frozen=True)
class DomainInfo:
    name: str
    uuid: str
    state: str  # running, paused, shutoff, crashed or other
    vcpus: int
    memory_mb: int


@dataclass(frozen=True)
class DomainStats:
    """What an active domain has used: its CPU time over all vCPUs (ns) when libvirt read it, on the
    `time.monotonic` clock (seconds), and libvirt's `balloon.*` stats (KiB; the QEMU driver only)."""

    cpu_time_ns: int
    sampled: float
    balloon: dict[str, int]


def _domain_info(dom: libvirt.virDomain) -> DomainInfo:
    state, max_kib, _kib, vcpus, _cpu_time = dom.info()
    return DomainInfo(dom.name(), dom.UUIDString(), _STATES.get(state, "other"), vcpus, max_kib // 1024)


class HypervisorActor(pykka.ThreadingActor):
    """Owns one libvirt connection; everything here runs in the actor's own thread.

    Its public methods are the requests, called through a pykka proxy (`Hypervisor`). A failure travels
    back to the caller in the future: `HypervisorError`, or the `libvirt.libvirtError` itself, which the
    caller translates (`_translate`).
    """

    def __init__(self, uri: str) -> None:
        super().__init__()
        self._uri = uri
        self._conn: libvirt.virConnect | None = None
        self._open_error: HypervisorError | None = None

    def on_start(self) -> None:
        try:
            if self._uri.startswith("qemu:///embed?root="):
                self._conn = open_embed(Path(self._uri.partition("=")[2]))
            else:
                self._conn = libvirt.open(self._uri)
        except libvirt.libvirtError as err:
            self._open_error = _translate(err, f"cannot open {self._uri}: ")
        except Exception as exc:  # keep the actor alive so that `check_open` can report it
            self._open_error = HypervisorError(f"cannot open {self._uri}: {exc}")
            self._open_error.__cause__ = exc

    def on_stop(self) -> None:
        self._disconnect()

    def on_failure(self, *_exc_info: object) -> None:
        self._disconnect()

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except libvirt.libvirtError as err:
                log.warning("closing %s: %s", self._uri, _message(err))

    @property
    def _connection(self) -> libvirt.virConnect:
        if self._conn is None:
            raise self._open_error or HypervisorError("hypervisor is closed")
        return self._conn

    def _lookup(self, name: str) -> libvirt.virDomain:
        try:
            return self._connection.lookupByName(name)
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise HypervisorError(f"no domain named {name!r}") from None
            raise

    # -- requests (through a proxy; each runs in this actor's thread) --

    def check_open(self) -> None:
        if self._open_error is not None:
            raise self._open_error

    def host_info(self) -> HostInfo:
        model, memory_mb, cpus, *_ = self._connection.getInfo()
        return HostInfo(model, cpus, memory_mb)

    def define(self, xml: str) -> DomainInfo:
        return _domain_info(self._connection.defineXML(self._keep_uuid(xml)))

    def _keep_uuid(self, xml: str) -> str:
        """Give XML without a <uuid> the uuid of the existing domain of that name, if any, so that
        redefining it updates that domain instead of failing on a freshly generated uuid."""
        try:
            root = ET.fromstring(xml)
        except ET.ParseError:
            return xml  # let libvirt explain what is wrong with it
        name = root.findtext("name")
        if root.find("uuid") is not None or not name:
            return xml
        try:
            existing = self._connection.lookupByName(name)
        except libvirt.libvirtError:
            return xml
        ET.SubElement(root, "uuid").text = existing.UUIDString()
        return ET.tostring(root, encoding="unicode")

    def start_domain(self, name: str) -> DomainInfo:
        """(Not `start`: that is how a pykka actor is started.)"""
        dom = self._lookup(name)
        if not dom.isActive():
            try:
                dom.create()
            except libvirt.libvirtError:
                if not dom.isActive():
                    raise
        return _domain_info(dom)

    def destroy(self, name: str) -> DomainInfo:
        dom = self._lookup(name)
        self._force_off(dom)
        return _domain_info(dom)

    def _force_off(self, dom: libvirt.virDomain) -> None:
        if dom.isActive():
            try:
                dom.destroy()
            except libvirt.libvirtError:
                if dom.isActive():
                    raise

    def suspend(self, name: str) -> DomainInfo:
        return self._transition(name, "suspend", want="paused", source="running",
                                act=lambda dom: dom.suspend())

    def resume(self, name: str) -> DomainInfo:
        return self._transition(name, "resume", want="running", source="paused",
                                act=lambda dom: dom.resume())

    def _transition(self, name: str, verb: str, want: str, source: str,
                    act: Callable[[libvirt.virDomain], object]) -> DomainInfo:
        dom = self._lookup(name)
        info = _domain_info(dom)
        if info.state == want:
            return info
        if info.state != source:
            raise HypervisorError(f"cannot {verb} {name!r}: it is {info.state}, not {source}")
        act(dom)
        return _domain_info(dom)

    def request_shutdown(self, name: str) -> tuple[DomainInfo, bool]:
        """Ask the guest to power off (ACPI); True if asked (or already off), False if it cannot be
        asked, so the caller should force it off. A paused guest is resumed first, to hear the request."""
        dom = self._lookup(name)
        if not dom.isActive():
            return _domain_info(dom), True
        try:
            if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                dom.resume()
            dom.shutdown()
        except libvirt.libvirtError as err:
            if dom.isActive():
                log.info("cannot ask %s to shut down (%s); it will be forced off", name, _message(err))
                return _domain_info(dom), False
        return _domain_info(dom), True

    def undefine(self, name: str) -> None:
        try:
            dom = self._lookup(name)
        except HypervisorError:
            return  # already gone
        try:
            self._force_off(dom)
            try:
                dom.undefineFlags(_UNDEFINE_FLAGS)
            except libvirt.libvirtError as err:
                if err.get_error_code() not in (libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_ERR_NO_SUPPORT):
                    raise
                dom.undefine()
        except libvirt.libvirtError as err:
            if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise

    def info(self, name: str) -> DomainInfo:
        return _domain_info(self._lookup(name))

    def xml(self, name: str) -> str:
        return self._lookup(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)

    def list(self) -> list[DomainInfo]:
        infos = []
        for dom in self._connection.listAllDomains():
            try:
                infos.append(_domain_info(dom))
            except libvirt.libvirtError as err:  # vanished (a transient domain) meanwhile
                if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
        return sorted(infos, key=lambda info: info.name)

    def crashed(self) -> builtins.list[str]:
        """The domains shut off by a crash (their QEMU died, or a guest panic stopped it) or by a start that
        failed, by name: libvirt's reason for the state, which no stop on purpose leaves."""
        names = []
        for dom in self._connection.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_SHUTOFF):
            try:
                state, reason = dom.state()
            except libvirt.libvirtError as err:  # undefined meanwhile
                if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
                continue
            if state == libvirt.VIR_DOMAIN_SHUTOFF and reason in _CRASH_REASONS:
                names.append(dom.name())
        return sorted(names)

    def stats(self) -> dict[str, DomainStats]:
        """Every active domain's stats, in one libvirt call. The test driver reports no `cpu.time` there, so
        the cpuTime of `virDomainGetInfo` stands in (for that driver, the wall clock: one busy vCPU)."""
        flags = libvirt.VIR_DOMAIN_STATS_CPU_TOTAL | libvirt.VIR_DOMAIN_STATS_BALLOON
        out = {}
        for dom, stats in self._connection.getAllDomainStats(flags, libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE):
            try:
                cpu = stats["cpu.time"] if "cpu.time" in stats else dom.info()[4]
                out[dom.name()] = DomainStats(int(cpu), time.monotonic(), {
                    k: int(v) for k, v in stats.items() if k.startswith("balloon.")})
            except libvirt.libvirtError as err:  # stopped or gone meanwhile: no sample
                if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
        return out

    def metadata(self, name: str, uri: str) -> str | None:
        """The domain's metadata element in namespace `uri` (XML), None if it has none."""
        try:
            return self._lookup(name).metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, uri, 0)
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                return None
            raise

    def set_metadata(self, name: str, uri: str, key: str, xml: str | None) -> str:
        """Set (None: remove) the domain's metadata element in namespace `uri`, written with prefix `key`, in
        its persistent definition (and the running one); returns the new definition."""
        dom = self._lookup(name)
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG | (libvirt.VIR_DOMAIN_AFFECT_LIVE if dom.isActive() else 0)
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, xml, key if xml is not None else None, uri, flags)
        return dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)

    # -- real guests: internal snapshots, managed save, live migration --

    def snapshot(self, name: str, tag: str) -> str:
        """An internal snapshot `tag` (disk, and memory when the domain is active); its XML, for REDEFINE
        on another host. A snapshot of that name already there is kept (idempotent)."""
        dom = self._lookup(name)
        try:
            return dom.snapshotLookupByName(tag).getXMLDesc()
        except libvirt.libvirtError as err:
            if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
                raise
        mirror.end(dom)
        doc = ET.Element("domainsnapshot")
        ET.SubElement(doc, "name").text = tag
        return dom.snapshotCreateXML(ET.tostring(doc, encoding="unicode")).getXMLDesc()

    def snapshot_redefine(self, name: str, xml: str) -> None:
        """Make a snapshot carried from another host known here (its data is already in the qcow2 disk)."""
        self._lookup(name).snapshotCreateXML(xml, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE)

    def snapshot_revert(self, name: str, tag: str, state: str) -> DomainInfo:
        """Revert to internal snapshot `tag`, ending running, paused or shut off as `state` says."""
        dom = self._lookup(name)
        flags = {"running": libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING,
                 "paused": libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_PAUSED}.get(state, 0)
        mirror.end(dom)
        dom.revertToSnapshot(dom.snapshotLookupByName(tag), flags | libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_FORCE)
        if state == "shutoff":
            self._force_off(dom)
        return _domain_info(dom)

    def snapshot_delete(self, name: str, tag: str) -> bool:
        """Delete internal snapshot `tag` (its data leaves the qcow2 file); whether there was one. A missing
        one is fine (idempotent)."""
        dom = self._lookup(name)
        try:
            snapshot = dom.snapshotLookupByName(tag)
        except libvirt.libvirtError as err:
            if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
                raise
            return False
        mirror.end(dom)
        snapshot.delete()
        return True

    def snapshot_names(self, name: str) -> builtins.list[str]:
        return sorted(self._lookup(name).snapshotListNames())

    def managed_save(self, name: str) -> DomainInfo:
        """Save the memory of an active domain into libvirt's managed save image and stop it; the next
        start resumes from the image. A domain already off is left alone."""
        dom = self._lookup(name)
        if dom.isActive():
            mirror.end(dom)
            dom.managedSave()
        return _domain_info(dom)

    def restore_file(self, path: str, xml: str, state: str) -> DomainInfo:
        """Start a domain from a save image (written by a managed save elsewhere), with definition `xml`."""
        flags = libvirt.VIR_DOMAIN_SAVE_PAUSED if state == "paused" else libvirt.VIR_DOMAIN_SAVE_RUNNING
        self._connection.restoreFlags(path, xml, flags)
        return _domain_info(self._lookup(ET.fromstring(xml).findtext("name") or ""))

    def migrate(self, name: str, uri: str, flags: int, params: dict[str, Any]) -> None:
        dom = self._lookup(name)
        mirror.end(dom)
        dom.migrateToURI3(uri, params, flags)

    # -- a real guest's disk mirrored to another node (`agents.hypervisor.mirror`) --

    def mirror_begin(self, name: str, host: str, port: int, export: str, sync: bool) -> None:
        mirror.begin(self._lookup(name), host, port, export, sync)

    def mirror_job(self, name: str) -> mirror.CopyJob | None:
        try:
            return mirror.job(self._lookup(name))
        except HypervisorError:
            return None  # the domain left (migrated away, undefined): no job

    def mirror_limit_writes(self, name: str, rate: int) -> None:
        mirror.limit_writes(self._lookup(name), rate)

    def mirror_end(self, name: str) -> bool:
        try:
            return mirror.end(self._lookup(name))
        except HypervisorError:
            return False  # the domain left (a migration ended its job first)

    def persistent(self, name: str) -> bool:
        """Whether a persistent domain of that name is here (one that arrived by live migration counts)."""
        try:
            return bool(self._lookup(name).isPersistent())
        except HypervisorError:
            return False


# -- the trio-facing handle ------------------------------------------------------------------------


class Hypervisor:
    """Trio-facing handle; owns a pool of `HypervisorActor`s. Create it with `Hypervisor.open(uri)` (or
    `await Hypervisor.connect(uri)`, which opens the connections in a worker thread).

    Each request borrows an idle actor's proxy, calls the method on it, and awaits the pykka future in
    a worker thread (one waiting thread per busy connection: the limiter has the pool's size). A caller
    cancelled while its request runs returns at once; the actor finishes the request and goes back to
    the pool only then, so no request ever queues behind a forgotten one.
    """

    actor_class: ClassVar[type[HypervisorActor]] = HypervisorActor
    poll_interval: ClassVar[tuple[float, float]] = (0.05, 1.0)
    """First and longest pause between state polls while a graceful shutdown is under way."""

    def __init__(self, uri: str, refs: list[pykka.ActorRef[HypervisorActor]]) -> None:
        self.uri = uri
        self._refs = refs
        self._closed = False
        self._limiter = trio.CapacityLimiter(len(refs))
        self._long = trio.CapacityLimiter(max(1, len(refs) - 1))
        """Long calls (a migration, a save, a restore, an internal snapshot) take at most all connections but
        one, so a short call (`list`, `info`) never waits for four migrations to end."""
        self._give_back, self._idle = trio.open_memory_channel[pykka.ActorProxy[HypervisorActor]](len(refs))
        for ref in refs:
            self._give_back.send_nowait(ref.proxy())

    @property
    def connections(self) -> int:
        return len(self._refs)

    @classmethod
    def open(cls, uri: str, connections: int = 1) -> Hypervisor:
        """Start `connections` actors, each opening its connection in its own thread. This blocks the caller
        (briefly, for the test driver) until they are open; raises HypervisorError if one cannot be."""
        return cls(uri, cls._start_actors(uri, connections))

    @classmethod
    async def connect(cls, uri: str, connections: int = 1) -> Hypervisor:
        """`open`, without blocking the event loop while the connections open."""
        return cls(uri, await trio.to_thread.run_sync(cls._start_actors, uri, connections))

    @classmethod
    def _start_actors(cls, uri: str, connections: int) -> list[pykka.ActorRef[HypervisorActor]]:
        refs: list[pykka.ActorRef[HypervisorActor]] = []
        try:
            for _ in range(max(1, connections)):
                refs.append(cls.actor_class.start(uri))
                refs[-1].proxy().check_open().get()
        except pykka.ActorDeadError:
            cls._stop(refs)
            raise HypervisorError(f"cannot open {uri}: the hypervisor actor died") from None
        except HypervisorError:
            cls._stop(refs)
            raise
        return refs

    @staticmethod
    def _stop(refs: list[pykka.ActorRef[HypervisorActor]]) -> None:
        for ref in refs:
            ref.stop(block=True)

    async def _run_long(self, request: Callable[[Any], pykka.Future[T]]) -> T:
        """`_run` for a call that may take seconds: it leaves a connection free for the short ones."""
        async with self._long:
            return await self._run(request)

    async def _run(self, request: Callable[[Any], pykka.Future[T]]) -> T:
        """`request(proxy)` on an idle actor, awaited without blocking the loop; libvirt's errors become
        HypervisorError."""
        if self._closed:
            raise HypervisorError("hypervisor is closed")
        proxy = await self._idle.receive()
        try:
            future = request(proxy)
        except pykka.ActorDeadError:
            self._give_back.send_nowait(proxy)
            raise HypervisorError("hypervisor is closed") from None

        def wait() -> T:
            """In a worker thread: the answer; the actor goes back to the pool once it has answered, even
            if the caller was cancelled meanwhile (the thread is then abandoned, but still runs)."""
            try:
                return future.get()
            finally:
                with contextlib.suppress(trio.RunFinishedError):
                    trio.from_thread.run_sync(self._give_back.send_nowait, proxy)

        try:
            return await trio.to_thread.run_sync(wait, abandon_on_cancel=True, limiter=self._limiter)
        except pykka.ActorDeadError:
            raise HypervisorError("hypervisor is closed") from None
        except libvirt.libvirtError as err:
            raise _translate(err) from err

    async def host_info(self) -> HostInfo:
        return await self._run(lambda actor: actor.host_info())

    async def define(self, xml: str) -> DomainInfo:
        """Define (or redefine: same name and uuid) a persistent domain."""
        return await self._run(lambda actor: actor.define(xml))

    async def start(self, name: str) -> DomainInfo:
        """Boot the domain; one already active (running or paused) is returned as it is."""
        return await self._run(lambda actor: actor.start_domain(name))

    async def shutdown(self, name: str, timeout: float = 30.0) -> DomainInfo:
        """Ask the guest to power off, wait up to `timeout` seconds for it, then force it off.

        The wait happens here, between short `info` requests, so the actors serve other callers meanwhile.
        """
        info, asked = await self._run(lambda actor: actor.request_shutdown(name))
        if asked:
            deadline = trio.current_time() + timeout
            pause, longest = self.poll_interval
            while info.state != "shutoff" and (remaining := deadline - trio.current_time()) > 0:
                await trio.sleep(min(pause, remaining))
                pause = min(pause * 2, longest)
                info = await self.info(name)
        if info.state == "shutoff":
            return info
        if asked:
            log.warning("%s did not shut down within %gs; forcing it off", name, timeout)
        return await self.destroy(name)

    async def destroy(self, name: str) -> DomainInfo:
        """Force the domain off; one already off is returned as it is."""
        return await self._run(lambda actor: actor.destroy(name))

    async def suspend(self, name: str) -> DomainInfo:
        """Pause a running domain; a paused one is returned as it is, a stopped one is an error."""
        return await self._run(lambda actor: actor.suspend(name))

    async def resume(self, name: str) -> DomainInfo:
        """Unpause a paused domain; a running one is returned as it is, a stopped one is an error."""
        return await self._run(lambda actor: actor.resume(name))

    async def undefine(self, name: str) -> None:
        """Force the domain off if needed and forget it; a missing domain is fine."""
        await self._run(lambda actor: actor.undefine(name))

    async def info(self, name: str) -> DomainInfo:
        return await self._run(lambda actor: actor.info(name))

    async def xml(self, name: str) -> str:
        """The domain's persistent definition as libvirt holds it: what `define` takes on another host."""
        return await self._run(lambda actor: actor.xml(name))

    async def settle(self, name: str, state: str) -> DomainInfo:
        """Bring the domain to `state` (running, paused or shutoff) from whatever state it is in, forcing
        it off for shutoff; a domain already there is left alone."""
        if state == "shutoff":
            return await self.destroy(name)
        if state not in SETTLED:
            raise HypervisorError(f"cannot bring {name!r} to state {state!r}: expected one of {', '.join(SETTLED)}")
        await self.start(name)
        return await (self.resume(name) if state == "running" else self.suspend(name))

    async def list(self) -> list[DomainInfo]:
        """Every domain of the host, by name."""
        return await self._run(lambda actor: actor.list())

    async def crashed(self) -> builtins.list[str]:
        """The domains shut off by a crash or a failed start, by name (`HypervisorActor.crashed`)."""
        return await self._run(lambda actor: actor.crashed())

    async def stats(self) -> dict[str, DomainStats]:
        """CPU time and balloon stats of every active domain, by name (`dvms.monitor` turns them into demand)."""
        return await self._run(lambda actor: actor.stats())

    async def metadata(self, name: str, uri: str) -> str | None:
        """The domain's own metadata element in namespace `uri`, which travels with its definition."""
        return await self._run(lambda actor: actor.metadata(name, uri))

    async def set_metadata(self, name: str, uri: str, key: str, xml: str | None) -> str:
        """Set or (xml None) remove that element; returns the domain's new persistent definition."""
        return await self._run(lambda actor: actor.set_metadata(name, uri, key, xml))

    async def snapshot(self, name: str, tag: str) -> str:
        """An internal snapshot (QEMU driver, qcow2 disks); returns its XML."""
        return await self._run_long(lambda actor: actor.snapshot(name, tag))

    async def snapshot_redefine(self, name: str, xml: str) -> None:
        await self._run(lambda actor: actor.snapshot_redefine(name, xml))

    async def snapshot_revert(self, name: str, tag: str, state: str) -> DomainInfo:
        return await self._run_long(lambda actor: actor.snapshot_revert(name, tag, state))

    async def snapshot_delete(self, name: str, tag: str) -> bool:
        """Delete an internal snapshot; whether there was one."""
        return await self._run(lambda actor: actor.snapshot_delete(name, tag))

    async def snapshot_names(self, name: str) -> builtins.list[str]:
        return await self._run(lambda actor: actor.snapshot_names(name))

    async def managed_save(self, name: str) -> DomainInfo:
        return await self._run_long(lambda actor: actor.managed_save(name))

    async def restore_file(self, path: str, xml: str, state: str) -> DomainInfo:
        return await self._run_long(lambda actor: actor.restore_file(path, xml, state))

    async def migrate(self, name: str, uri: str, flags: int, params: dict[str, Any]) -> None:
        """Peer-to-peer migration driven by this host's daemon; one connection is busy until it ends."""
        await self._run_long(lambda actor: actor.migrate(name, uri, flags, params))

    async def persistent(self, name: str) -> bool:
        return await self._run(lambda actor: actor.persistent(name))

    async def mirror_begin(self, name: str, host: str, port: int, export: str, sync: bool = False) -> None:
        """Mirror the domain's disk to NBD `export` at host:port (`agents.hypervisor.mirror`)."""
        await self._run(lambda actor: actor.mirror_begin(name, host, port, export, sync))

    async def mirror_job(self, name: str) -> mirror.CopyJob | None:
        return await self._run(lambda actor: actor.mirror_job(name))

    async def mirror_limit_writes(self, name: str, rate: int) -> None:
        """Cap the guest's disk writes at `rate` bytes/s (0: no cap) while its mirror catches up."""
        await self._run(lambda actor: actor.mirror_limit_writes(name, rate))

    async def mirror_end(self, name: str) -> bool:
        """End the domain's mirror job (the destination keeps a consistent copy); whether there was one."""
        return await self._run_long(lambda actor: actor.mirror_end(name))

    async def close(self) -> None:
        """Close the connections and stop the actors, after the requests already sent. Safe to call twice.

        The stop requests go out at once, so even if this is cancelled the actors still stop."""
        if self._closed:
            return
        self._closed = True
        stopped = [ref.stop(block=False) for ref in self._refs]
        await trio.to_thread.run_sync(pykka.get_all, stopped, abandon_on_cancel=True)
