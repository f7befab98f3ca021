"""The Cleanup stack (no root), and what a killed or interrupted run leaves behind (root)."""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conformance.errors import HarnessError
from conformance.net.cleanup import Cleanup
from conformance.net.names import (
    STATE_DIR,
    netns_owner,
    owner_alive,
    remove_netns,
    run_prefix,
    sweep_stale,
)
from conformance.proc import Background

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces)")
REPO = Path(__file__).resolve().parents[1]


# --- the Cleanup stack -------------------------------------------------------------------------

def test_runs_newest_first_with_arguments():
    done = []
    c = Cleanup()
    c.defer("one", done.append, 1)
    c.defer("two", lambda x, y=0: done.append(x + y), 2, y=10)
    c.defer("three", done.append, 3)
    assert len(c) == 3
    c.run()
    assert done == [3, 12, 1]
    assert len(c) == 0
    c.run()  # nothing left: a second run does nothing
    assert done == [3, 12, 1]


def test_context_manager_runs_on_exception():
    done = []
    with pytest.raises(ValueError, match="case broke"), Cleanup() as c:
        c.defer("a", done.append, "a")
        c.defer("b", done.append, "b")
        raise ValueError("case broke")
    assert done == ["b", "a"]


def test_keeps_going_after_failures_and_lists_them_all():
    done = []

    def boom(msg):
        raise RuntimeError(msg)

    c = Cleanup()
    c.defer("first step", done.append, 1)
    c.defer("permission step", _raise, PermissionError(errno.EPERM, "Operation not permitted"))
    c.defer("second step", boom, "kaboom two")
    c.defer("middle step", done.append, 2)
    c.defer("third step", boom, "kaboom three")
    c.defer("last step", done.append, 3)
    with pytest.raises(HarnessError) as exc:
        c.run()
    assert done == [3, 2, 1]  # every step ran, in LIFO order
    msg = str(exc.value)
    assert msg.startswith("cleanup failed:")
    assert "third step: kaboom three" in msg
    assert "second step: kaboom two" in msg
    assert "permission step: [Errno 1] Operation not permitted" in msg
    assert msg.index("third step") < msg.index("second step") < msg.index("permission step")
    assert "first step" not in msg and "middle step" not in msg and "last step" not in msg
    assert len(c) == 0


@pytest.mark.parametrize("exc", [
    FileNotFoundError(errno.ENOENT, "No such file or directory"),
    OSError(errno.ENODEV, "No such device"),
    ProcessLookupError(errno.ESRCH, "No such process"),
], ids=["ENOENT", "ENODEV", "ESRCH"])
def test_already_gone_is_not_a_failure(exc):
    done = []
    c = Cleanup()
    c.defer("after", done.append, "after")
    c.defer("gone", _raise, exc)
    c.defer("before", done.append, "before")
    c.run()  # no exception
    assert done == ["before", "after"]


def test_other_oserrors_are_failures():
    c = Cleanup()
    c.defer("busy", _raise, OSError(errno.EBUSY, "Device or resource busy"))
    with pytest.raises(HarnessError, match=r"busy: \[Errno 16\] Device or resource busy"):
        c.run()


def test_rejects_non_callable_with_hint():
    def remove():
        return None

    c = Cleanup()
    with pytest.raises(TypeError, match=r"defer\('remove link'\): None is not callable; "
                                        r"pass the function, do not call it"):
        c.defer("remove link", remove())
    with pytest.raises(TypeError, match="not callable"):
        c.defer("a string", "ip link del x")
    assert len(c) == 0


def _raise(exc: BaseException) -> None:
    raise exc


# --- names and owners (pure parts) -------------------------------------------------------------

def test_netns_owner():
    assert netns_owner("mpc123-c1") == 123
    assert netns_owner("mpc123-bl-c1") == 123
    assert netns_owner("mpc-c1") is None
    assert netns_owner("xmpc123-c1") is None
    assert netns_owner("mpc123") is None
    assert netns_owner("docker-ns") is None


@needs_root
def test_run_prefix_and_owner_record():
    prefix = run_prefix()
    assert prefix == f"mpc{os.getpid()}"
    record = json.loads((STATE_DIR / f"{prefix}.json").read_text())
    assert record["pid"] == os.getpid()
    assert owner_alive(os.getpid())


@needs_root
def test_recycled_pid_is_not_a_live_owner():
    """A record whose start time does not match the process now holding that PID is stale."""
    proc = subprocess.Popen(["sleep", "60"])
    record = STATE_DIR / f"mpc{proc.pid}.json"
    try:
        record.write_text(json.dumps({"pid": proc.pid, "start": "1", "cmd": "an older process"}))
        assert not owner_alive(proc.pid)
        record.unlink()
        assert owner_alive(proc.pid)  # live and no record: never touched
    finally:
        record.unlink(missing_ok=True)
        proc.kill()
        proc.wait()
    assert not owner_alive(proc.pid)


# --- killed and interrupted runs (root) ---------------------------------------------------------

CHILD = r"""
import signal, time
from conformance.net.names import release_run, run_prefix, run_tmpdir
from conformance.net.network import network
from conformance.net.registry import make_topology
from conformance.proc import Background

signal.signal(signal.SIGINT, signal.default_int_handler)
prefix = run_prefix()
run_tmpdir()
try:
    with network(make_topology("two_path")) as net:
        sleeper = Background(["sleep", "600"], netns=net.netns("s1"))
        print("up", prefix, sleeper.pid, *[n.pid for n in net.nodes()], flush=True)
        time.sleep(600)
finally:
    release_run()
"""


def _netns_list() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pids: list[int], timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if _alive(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


class _Child:
    """The CHILD run: its prefix, the sleeper it started in s1, and its node shells."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD], cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("up "):
            self.proc.kill()
            _, err = self.proc.communicate(timeout=30)
            pytest.fail(f"child run did not come up: {line!r}\n{err}")
        _, self.prefix, sleeper, *shells = line.split()
        self.sleeper, self.shells = int(sleeper), [int(p) for p in shells]
        self.netns = sorted(f"{self.prefix}-{n}" for n in ("c1", "r1", "r2", "rs", "s1"))
        self.record = STATE_DIR / f"{self.prefix}.json"
        self.tmpdir = Path(tempfile.gettempdir()) / f"mptcp-conformance-{self.prefix}"

    def leftover_netns(self) -> list[str]:
        return sorted(n for n in _netns_list() if n.startswith(self.prefix + "-"))

    def last_resort(self) -> None:
        """Whatever a failed test left of this child (only its own names and PIDs)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for name in self.leftover_netns():
            remove_netns(name)
        for pid in [self.sleeper, *self.shells]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.record.unlink(missing_ok=True)


@needs_root
def test_sweep_removes_a_killed_runs_leftovers_only():
    live = f"{run_prefix()}-live"
    from pyroute2 import netns as pr_netns

    pr_netns.create(live)
    live_sleeper = Background(["sleep", "600"], netns=live)
    child = _Child()
    try:
        assert child.leftover_netns() == child.netns
        os.kill(child.proc.pid, signal.SIGKILL)
        child.proc.wait(10)  # reaped, as its shell would: a zombie still looks like a live owner

        # What a killed run leaves behind.
        assert child.leftover_netns() == child.netns
        assert _alive(child.sleeper), "the process started inside s1 should outlive its run"
        assert child.record.exists() and child.tmpdir.is_dir()

        report = sweep_stale()

        assert set(child.netns) <= set(report.removed_netns)
        assert child.prefix in report.removed_records
        assert child.leftover_netns() == []
        assert _wait_gone([child.sleeper, *child.shells]) == []
        assert not child.record.exists()
        assert not child.tmpdir.exists()
        assert [n for n in report.removed_netns if netns_owner(n) == os.getpid()] == []
        # A live run (this one) is untouched: its namespace and what runs inside.
        assert live in _netns_list()
        assert live_sleeper.running()
        assert (STATE_DIR / f"{run_prefix()}.json").exists()
        assert "removed" in str(report) and child.netns[0] in str(report)
    finally:
        child.last_resort()
        live_sleeper.stop()
        remove_netns(live)
    assert live not in _netns_list()


@needs_root
def test_ctrl_c_inside_the_with_block_removes_everything():
    child = _Child()
    try:
        assert child.leftover_netns() == child.netns
        assert _alive(child.sleeper)
        os.kill(child.proc.pid, signal.SIGINT)
        try:
            _, err = child.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the run did not stop within 60 s of Ctrl-C")
        assert child.proc.returncode == -signal.SIGINT, err
        assert "KeyboardInterrupt" in err
        assert "cleanup failed" not in err, err
        assert child.leftover_netns() == []
        assert _wait_gone([child.sleeper, *child.shells]) == []
        assert not child.record.exists()
        assert not child.tmpdir.exists()
    finally:
        child.last_resort()


# --- fixes: interrupts during teardown and bring-up, stray records, zombies, two networks -------

def test_second_interrupt_during_teardown_still_undoes_everything():
    done: list[str] = []
    cleanup = Cleanup()
    cleanup.defer("first", done.append, "first")
    cleanup.defer("interrupted", _raise, KeyboardInterrupt())
    cleanup.defer("last", done.append, "last")
    with pytest.raises(KeyboardInterrupt):
        cleanup.run()
    assert done == ["last", "first"]
    assert len(cleanup) == 0


def test_deferred_interrupts_hold_the_signal_until_the_block_ends():
    from conformance.net.cleanup import deferred_interrupts

    reached_end = False
    with pytest.raises(KeyboardInterrupt), deferred_interrupts():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        reached_end = True
    assert reached_end


@needs_root
def test_stray_file_in_state_dir_does_not_break_the_sweep():
    stray = STATE_DIR / "mpc123.bak.json"
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    stray.write_text("{}")
    try:
        sweep_stale()
        assert stray.exists()  # not ours to remove either
    finally:
        stray.unlink(missing_ok=True)


@needs_root
def test_unreaped_owner_counts_as_gone():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        assert not owner_alive(proc.pid)
    finally:
        proc.wait()


@needs_root
def test_two_networks_in_one_process_do_not_collide():
    from conformance.net.network import network
    from conformance.net.registry import make_topology

    with network(make_topology("two_path")) as first:
        with network(make_topology("two_path")) as second:
            assert first.netns("c1") != second.netns("c1")
            assert netns_owner(second.netns("c1")) == os.getpid()
        assert Path(f"/run/netns/{first.netns('c1')}").exists()
    assert not any(n.startswith(f"{run_prefix()}-") for n in os.listdir("/run/netns"))
