"""The shell that keeps each wanted VM's disk mirrored (agents.host.replication), on a fake host in memory (no
libvirt, no peer) and trio's autojump clock: a wanted VM's mirror is begun, watched, announced ready once and
ended when no longer wanted; a job that ends on its own is settled and begun again RESTART seconds later; a
start that fails is retried after growing pauses, `status` saying why meanwhile."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
import trio
import trio.testing

from agents.host.replication import BACKOFF_LIMIT, POLL, RESTART, MirrorWant, Replication
from agents.hypervisor.actor import HypervisorError
from agents.hypervisor.mirror import CopyJob
from agents.messages import MirrorStatus
from overlay.wire.rpc import RemoteError, RpcTimeout, Unreachable

VM = "shop:db"
DISK = 1 << 30
WANT = MirrorWant("node2", "10.0.0.2:7000", sync=False, bandwidth=50 << 20)
ENDED = "waiting: the job ended (an operation on the VM, or the VM stopped)"


class FakeHost:
    """`MirroringHost` in memory: `jobs` is what libvirt would show (a test edits it to move a job on, or
    deletes it to end the job behind the shell's back); `answers` are begin_mirror's next outcomes (False, or an
    error to raise) before it starts jobs again; every call is recorded with the time it came."""

    def __init__(self) -> None:
        self.mirror_status: Callable[[], list[MirrorStatus]] = list
        self.jobs: dict[str, CopyJob] = {}
        self.answers: list[bool | Exception] = []
        self.begun: list[tuple[float, str, str, int, bool]] = []
        self.polls: Counter[str] = Counter()
        self.announced: list[tuple[float, str, str]] = []
        self.take_ready = True
        self.ended: list[tuple[float, str, str, bool]] = []
        self.caps: list[tuple[float, str, int]] = []

    async def begin_mirror(self, name: str, addr: str, bandwidth: int, sync: bool) -> bool:
        await trio.lowlevel.checkpoint()
        self.begun.append((trio.current_time(), name, addr, bandwidth, sync))
        if self.answers:
            answer = self.answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer
        self.jobs[name] = CopyJob(0, DISK, False, "vda")
        return True

    async def mirror_job(self, name: str) -> CopyJob | None:
        await trio.lowlevel.checkpoint()
        self.polls[name] += 1
        return self.jobs.get(name)

    async def announce_ready(self, name: str, addr: str) -> bool:
        await trio.lowlevel.checkpoint()
        self.announced.append((trio.current_time(), name, addr))
        return self.take_ready

    async def limit_writes(self, name: str, rate: int) -> None:
        await trio.lowlevel.checkpoint()
        self.caps.append((trio.current_time(), name, rate))

    async def end_mirror(self, name: str, addr: str, was_ready: bool) -> None:
        await trio.lowlevel.checkpoint()
        self.ended.append((trio.current_time(), name, addr, was_ready))
        self.jobs.pop(name, None)


@dataclass
class Rig:
    host: FakeHost
    actor: Replication

    def state(self, name: str = VM) -> str:
        return next(s.state for s in self.actor.status() if s.name == name)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    """The actor running on a fake host (the tests ask for `autojump_clock`: pytest-trio takes the clock from a
    test's own arguments only)."""
    host = FakeHost()
    actor = Replication(host)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(actor.run)
        yield Rig(host, actor)
        nursery.cancel_scope.cancel()


async def wait(predicate: Callable[[], bool], seconds: float = 600.0) -> None:
    with trio.fail_after(seconds):
        while not predicate():
            await trio.sleep(0.05)


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:], strict=False)]


async def ready(rig: Rig, name: str = VM, size: int = DISK) -> None:
    """The job of `name` finishes its first pass; wait until the shell announced it."""
    announced = len(rig.host.announced)
    rig.host.jobs[name] = CopyJob(size, size, True, "vda")
    await wait(lambda: len(rig.host.announced) > announced and rig.state(name) == "ready")


async def test_a_wanted_vm_is_mirrored_announced_once_and_ended_once_no_longer_wanted(
        rig: Rig, autojump_clock: trio.testing.MockClock) -> None:
    host, actor = rig.host, rig.actor
    assert host.mirror_status == actor.status  # the host answers `host.mirrors` with the shell's status
    wanted_at = trio.current_time()
    actor.want({VM: WANT})
    await wait(lambda: host.polls[VM] >= 3)
    assert [b[1:] for b in host.begun] == [(VM, WANT.addr, WANT.bandwidth, False)]
    assert host.begun[0][0] - wanted_at <= POLL  # at the next tick
    [syncing] = actor.status()
    assert (syncing.name, syncing.node, syncing.state, syncing.behind, syncing.sent, syncing.sync) == (
        VM, "node2", "syncing", DISK, 0, False)
    assert syncing.lag >= trio.current_time() - host.begun[0][0]  # nothing copied since it began

    await ready(rig)
    await trio.sleep(5 * POLL)  # several more polls of a ready job
    assert [a[1:] for a in host.announced] == [(VM, WANT.addr)]  # once
    assert actor.status() == [MirrorStatus(VM, "node2", "ready", 0.0, 0, DISK, False)]

    behind_from = trio.current_time()
    host.jobs[VM] = CopyJob(DISK, DISK + 4096, True, "vda")  # a write not copied yet
    await trio.sleep(3.0)
    [late] = actor.status()
    now = trio.current_time()
    assert late.state == "ready" and (late.behind, late.sent) == (4096, DISK)
    assert now - behind_from <= late.lag <= now - behind_from + POLL
    assert len(host.announced) == 1

    host.jobs[VM] = CopyJob(DISK + 4096, DISK + 4096, True, "vda")
    await trio.sleep(2 * POLL)
    actor.want({})
    await wait(lambda: bool(host.ended))
    assert [e[1:] for e in host.ended] == [(VM, WANT.addr, True)]
    assert actor.status() == [] and actor.sent[VM] == DISK + 4096
    await trio.sleep(30)
    assert len(host.begun) == 1 and len(host.ended) == 1  # not begun again, nor ended twice


async def test_a_job_that_ends_on_its_own_is_settled_and_begun_again_after_restart(
        rig: Rig, autojump_clock: trio.testing.MockClock) -> None:
    host, actor = rig.host, rig.actor
    actor.want({VM: WANT})
    await wait(lambda: bool(host.begun))
    await ready(rig)
    del host.jobs[VM]  # a snapshot of the VM ended it
    await wait(lambda: bool(host.ended))
    ended_at, *settled = host.ended[0]
    assert settled == [VM, WANT.addr, True]  # it was ready: the standby keeps a consistent copy
    [waiting] = actor.status()
    assert (waiting.state, waiting.lag, waiting.behind, waiting.sent) == (ENDED, 0.0, 0, DISK)
    await wait(lambda: len(host.begun) == 2)
    assert RESTART <= host.begun[1][0] - ended_at <= RESTART + POLL
    await wait(lambda: rig.state() == "syncing")
    await ready(rig)
    assert len(host.announced) == 2 and actor.status()[0].sent == 2 * DISK  # both jobs' bytes


async def test_a_job_that_ends_before_it_is_ready_is_settled_as_not_ready(
        rig: Rig, autojump_clock: trio.testing.MockClock) -> None:
    host, actor = rig.host, rig.actor
    actor.want({VM: WANT})
    await wait(lambda: host.polls[VM] >= 2)
    host.jobs[VM] = CopyJob(DISK // 2, DISK, False, "vda")
    await trio.sleep(POLL)
    del host.jobs[VM]  # the guest stopped during the first pass
    await wait(lambda: bool(host.ended))
    assert [e[1:] for e in host.ended] == [(VM, WANT.addr, False)]  # the standby drops the half copy
    assert host.announced == [] and rig.state() == ENDED and actor.sent[VM] == DISK // 2
    await wait(lambda: len(host.begun) == 2)
    assert host.begun[1][0] - host.ended[0][0] >= RESTART


@pytest.mark.parametrize("error", [
    Unreachable("10.0.0.2:7000: connection refused"),
    RpcTimeout("no answer from 10.0.0.2:7000"),
    RemoteError("conflict", "cannot receive the mirror of shop:db: no standby copy"),
    HypervisorError("Requested operation is not valid: domain is not running"),
], ids=type)
async def test_a_start_that_fails_is_retried_after_growing_pauses_and_shows_why(
        rig: Rig, autojump_clock: trio.testing.MockClock, error: Exception) -> None:
    host, actor = rig.host, rig.actor
    failures = 7
    host.answers = [error] * failures
    actor.want({VM: WANT})
    await wait(lambda: len(host.begun) == 1)
    assert rig.state() == f"waiting: {error}"
    assert actor.status()[0].lag == 0.0
    await wait(lambda: len(host.begun) == failures + 1)
    pauses = [min(RESTART * 2 ** k, BACKOFF_LIMIT) for k in range(1, failures + 1)]
    assert pauses[-2:] == [BACKOFF_LIMIT, BACKOFF_LIMIT]  # the limit is reached
    for gap, pause in zip(gaps([b[0] for b in host.begun]), pauses, strict=True):
        assert pause <= gap <= pause + POLL, (gap, pause)
    assert host.ended == []  # nothing began: nothing to settle
    await wait(lambda: rig.state() == "syncing")
    await ready(rig)
    del host.jobs[VM]  # a mirror that got ready clears the failures: the next start comes RESTART later
    await wait(lambda: len(host.begun) == failures + 2)
    assert RESTART <= host.begun[-1][0] - host.ended[-1][0] <= RESTART + POLL


async def test_a_vm_that_does_not_run_here_waits_and_is_tried_again(
        rig: Rig, autojump_clock: trio.testing.MockClock) -> None:
    host, actor = rig.host, rig.actor
    host.answers = [False, False]
    actor.want({VM: WANT})
    await wait(lambda: len(host.begun) == 1)
    assert actor.status() == [MirrorStatus(VM, "node2", "waiting: the VM does not run here", 0.0, 0, 0, False)]
    await wait(lambda: len(host.begun) == 3)
    first, second = gaps([b[0] for b in host.begun])
    assert RESTART < first < second  # backing off
    await wait(lambda: rig.state() == "syncing")
    assert host.ended == []


async def test_a_vm_no_longer_wanted_forgets_its_backoff(rig: Rig, autojump_clock: trio.testing.MockClock) -> None:
    host, actor = rig.host, rig.actor
    host.answers = [HypervisorError("domain is not running")] * 5
    actor.want({VM: WANT})
    await wait(lambda: len(host.begun) == 5)  # the next try would be 32 s later
    actor.want({})
    await trio.sleep(1.0)
    assert actor.status() == []
    rewanted_at = trio.current_time()
    actor.want({VM: WANT})
    await wait(lambda: len(host.begun) == 6)
    assert host.begun[-1][0] - rewanted_at <= POLL
    assert rig.state() == "syncing"


async def test_a_copy_that_moves_to_another_node_is_mirrored_there(
        rig: Rig, autojump_clock: trio.testing.MockClock) -> None:
    host, actor = rig.host, rig.actor
    actor.want({VM: WANT})
    await wait(lambda: bool(host.begun))
    await ready(rig)
    moved = MirrorWant("node3", "10.0.0.3:7000", sync=True)
    actor.want({VM: moved})
    await wait(lambda: len(host.begun) == 2)
    assert [e[1:] for e in host.ended] == [(VM, WANT.addr, True)]
    assert host.begun[1][1:] == (VM, moved.addr, 0, True)
    await wait(lambda: rig.state() == "syncing")
    [shown] = actor.status()
    assert (shown.node, shown.sync) == ("node3", True)


async def test_a_standby_node_that_refuses_the_ready_mirror_makes_it_start_over(
        rig: Rig, autojump_clock: trio.testing.MockClock) -> None:
    """The standby's node restarted and no longer exports the file: the copy is settled as not ready (it is
    dropped there) and a new mirror begins."""
    host, actor = rig.host, rig.actor
    host.take_ready = False
    actor.want({VM: WANT})
    await wait(lambda: bool(host.begun))
    host.jobs[VM] = CopyJob(DISK, DISK, True, "vda")
    await wait(lambda: bool(host.ended))
    assert [e[1:] for e in host.ended] == [(VM, WANT.addr, False)] and rig.state() == ENDED
    host.take_ready = True
    await wait(lambda: len(host.begun) == 2)
    await ready(rig)
    assert len(host.announced) == 2


async def test_vms_are_mirrored_independently_and_listed_by_name(
        rig: Rig, autojump_clock: trio.testing.MockClock) -> None:
    host, actor = rig.host, rig.actor
    other = MirrorWant("node4", "10.0.0.4:7000")
    host.answers = [HypervisorError("no disk")]  # the first start (of one of them) fails
    actor.want({VM: WANT, "shop:app": other})
    await wait(lambda: len(host.begun) == 2)
    failed = host.begun[0][1]
    fine = "shop:app" if failed == VM else VM
    await wait(lambda: rig.state(fine) == "syncing")
    assert [s.name for s in actor.status()] == ["shop:app", VM]
    assert rig.state(failed) == "waiting: no disk"
    await ready(rig, fine)
    await wait(lambda: rig.state(failed) == "syncing")  # tried again on its own schedule
    assert rig.state(fine) == "ready" and [a[1] for a in host.announced] == [fine]
    addr = {VM: WANT.addr, "shop:app": other.addr}
    assert Counter(b[1:3] for b in host.begun) == {(failed, addr[failed]): 2, (fine, addr[fine]): 1}


async def test_stopping_the_actor_settles_its_running_mirrors(autojump_clock: trio.testing.MockClock) -> None:
    """The agent shuts down: the mirror is ended with the standby's node even though the task is cancelled."""
    host = FakeHost()
    actor = Replication(host)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(actor.run)
        actor.want({VM: WANT})
        await wait(lambda: bool(host.begun))
        await ready(Rig(host, actor))
        nursery.cancel_scope.cancel()
    assert [e[1:] for e in host.ended] == [(VM, WANT.addr, True)]
    assert VM not in host.jobs


async def test_a_mirror_too_far_behind_holds_the_guest_back_until_it_caught_up_half_way(
        rig: Rig, autojump_clock: trio.testing.MockClock) -> None:
    """`max_lag` is a bound, not a wish: once the ready mirror is further behind, the guest's writes are capped
    below what the mirror copies; the cap is lifted once the lag is under half `max_lag`, and lifted too when the
    mirror ends while it holds."""
    host, actor = rig.host, rig.actor
    actor.want({VM: MirrorWant("node2", "10.0.0.2:7000", max_lag=5.0)})
    await wait(lambda: VM in host.jobs)
    await ready(rig)
    # the guest writes 10 MiB/s, the mirror copies 4 MiB/s: the backlog grows
    start, mib = trio.current_time(), 1 << 20
    while not host.caps:
        t = trio.current_time() - start
        host.jobs[VM] = CopyJob(DISK + int(4 * mib * t), DISK + int(10 * mib * t), True, "vda")
        await trio.sleep(POLL)
    (at, name, cap), = host.caps
    assert name == VM and at - start > 5.0  # not before the lag passed max_lag
    assert 0 < cap < 4 * mib and cap == pytest.approx(0.8 * 4 * mib, rel=0.2)  # below the copy rate
    assert next(s.held for s in actor.status() if s.name == VM) == cap
    # the mirror catches up: the cap goes
    host.jobs[VM] = CopyJob(DISK + 60 * mib, DISK + 60 * mib, True, "vda")
    await wait(lambda: len(host.caps) == 2)
    assert host.caps[-1][2] == 0
    # behind again, then the mirror ends: the cap is lifted on the way out
    host.jobs[VM] = CopyJob(DISK + 60 * mib, DISK + 200 * mib, True, "vda")
    await wait(lambda: len(host.caps) == 3)
    actor.want({})
    await wait(lambda: len(host.ended) == 1)
    assert [c[2] for c in host.caps][-1] == 0 and len(host.caps) == 4
