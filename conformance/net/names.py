"""Per-run names and the sweep of a killed run's leftovers.

Every namespace this project creates is called `<prefix>-<node>`, with prefix `mpc<pid>` of the
process that owns it. An owner record beside it holds the PID's start time, so a recycled PID is
not mistaken for a live owner. A new run removes the namespaces (and the processes inside them)
whose owner is gone; those of a live run, and anything without our prefix, are never touched."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from conformance.proc import NETNS_DIR

PREFIX_STEM = "mpc"
STATE_DIR = Path("/run/mptcp-conformance")
_PREFIX_RE = re.compile(rf"^{PREFIX_STEM}(\d+)-")
_prefix: str | None = None


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime) counts from after the parenthesised command name, which may hold spaces.
    return stat.rsplit(")", 1)[1].split()[19]


def run_prefix() -> str:
    """The prefix of this process's run (created, with its owner record, on first use)."""
    global _prefix
    if _prefix != f"{PREFIX_STEM}{os.getpid()}":  # unset, or inherited by a forked child
        pid = os.getpid()
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        (STATE_DIR / f"{PREFIX_STEM}{pid}.json").write_text(
            json.dumps({"pid": pid, "start": _start_time(pid), "cmd": _cmdline(pid)}))
        _prefix = f"{PREFIX_STEM}{pid}"
        atexit.register(release_run)
    return _prefix


def run_tmpdir() -> Path:
    """A temporary directory owned by this run (removed with the run, or by the next sweep)."""
    path = Path(tempfile.gettempdir()) / f"mptcp-conformance-{run_prefix()}"
    path.mkdir(exist_ok=True)
    return path


def release_run() -> None:
    """Forget this run: remove its owner record and temporary directory (its namespaces are gone)."""
    global _prefix
    # A forked child (pyroute2 forks helpers) inherits _prefix but owns nothing.
    if _prefix is None or _prefix != f"{PREFIX_STEM}{os.getpid()}":
        return
    with contextlib.suppress(FileNotFoundError):
        (STATE_DIR / f"{_prefix}.json").unlink()
    shutil.rmtree(Path(tempfile.gettempdir()) / f"mptcp-conformance-{_prefix}", ignore_errors=True)
    _prefix = None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return ""


def netns_name(node: str) -> str:
    """A free namespace name for `node` in this run: `<prefix>-<node>`, or `<prefix>-<k>-<node>`
    when this process already runs another topology with a node of that name."""
    prefix = run_prefix()
    name, k = f"{prefix}-{node}", 2
    while (NETNS_DIR / name).exists():
        name, k = f"{prefix}-{k}-{node}", k + 1
    return name


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def owner_alive(pid: int) -> bool:
    record = STATE_DIR / f"{PREFIX_STEM}{pid}.json"
    start = _start_time(pid)
    if start is None or _state(pid) in ("Z", "X"):  # killed but not yet reaped is gone too
        return False
    try:
        recorded = json.loads(record.read_text()).get("start")
    except (OSError, ValueError):
        return True  # a live process with our prefix but no record: leave it alone
    return recorded == start


def netns_owner(name: str) -> int | None:
    m = _PREFIX_RE.match(name)
    return int(m.group(1)) if m else None


def our_netns() -> list[str]:
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if netns_owner(n) is not None)
    except FileNotFoundError:
        return []


def pids_in_netns(path: str | Path) -> list[int]:
    """PIDs whose network namespace is the one bound at `path`."""
    try:
        target = os.stat(path)
    except OSError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (st.st_ino, st.st_dev) == (target.st_ino, target.st_dev) and int(entry) != os.getpid():
            pids.append(int(entry))
    return pids


def remove_netns(name: str) -> None:
    """Kill what runs inside netns `name`, then unbind it (the kernel frees it with its links)."""
    from pyroute2 import netns as pr_netns

    path = NETNS_DIR / name
    for _ in range(3):
        pids = pids_in_netns(path)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    with contextlib.suppress(FileNotFoundError):
        pr_netns.remove(name)


@dataclass
class SweepReport:
    removed_netns: list[str]
    removed_records: list[str]

    def __str__(self) -> str:
        return (f"removed {len(self.removed_netns)} stale namespace(s) of killed runs: "
                + ", ".join(self.removed_netns))


def sweep_stale() -> SweepReport:
    """Remove every leftover of runs whose owner process is gone."""
    removed, records = [], []
    for name in our_netns():
        pid = netns_owner(name)
        if pid is not None and not owner_alive(pid):
            remove_netns(name)
            removed.append(name)
    if STATE_DIR.is_dir():
        for record in STATE_DIR.glob(f"{PREFIX_STEM}*.json"):
            m = re.fullmatch(rf"{PREFIX_STEM}(\d+)", record.stem)
            if m is None:  # not a record of ours: leave it
                continue
            if not owner_alive(int(m.group(1))):
                record.unlink(missing_ok=True)
                shutil.rmtree(Path(tempfile.gettempdir()) / f"mptcp-conformance-{record.stem}",
                              ignore_errors=True)
                records.append(record.stem)
    # Temporary directories whose record was already gone.
    for tmp in Path(tempfile.gettempdir()).glob(f"mptcp-conformance-{PREFIX_STEM}*"):
        pid_text = tmp.name.rsplit(PREFIX_STEM, 1)[1]
        if pid_text.isdigit() and not owner_alive(int(pid_text)):
            shutil.rmtree(tmp, ignore_errors=True)
    return SweepReport(removed, records)
