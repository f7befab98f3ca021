"""Running commands, optionally inside a named network namespace.

Commands are argv lists with timeouts; a non-zero exit raises CommandError with the output tail.
Entering a namespace uses setns(2) in the child before exec, so no extra `ip netns exec` process
is spawned per command."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from conformance.errors import CommandError, HarnessError

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def netns_path(name: str) -> str:
    return str(NETNS_DIR / name)


def _setns_fd(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the calling thread inside netns `name` for the duration of the block.

    Only this thread moves (setns affects the calling thread), and it always moves back."""
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    there = os.open(netns_path(name), os.O_RDONLY)
    try:
        _setns_fd(there)
        try:
            yield
        finally:
            _setns_fd(here)
    finally:
        os.close(there)
        os.close(here)


PR_SET_PDEATHSIG = 1


def _preexec(netns: str | None, die_with_parent: bool = False):
    if netns is None and not die_with_parent:
        return None
    path = netns_path(netns) if netns is not None else None
    if path is not None and not os.path.exists(path):
        raise HarnessError(f"network namespace {netns} does not exist")

    def enter() -> None:
        if path is not None:
            fd = os.open(path, os.O_RDONLY)
            _setns_fd(fd)
            os.close(fd)
        # A process group of its own: we stop it by PID group, never by name.
        os.setpgid(0, 0)
        if die_with_parent:
            # Killed with the run even when the run is killed with SIGKILL and cleans up nothing.
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    return enter


def run(argv: list[str], *, netns: str | None = None, timeout: float = 30, check: bool = True,
        input: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run argv to completion and return the CompletedProcess (text mode)."""
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input,
                            preexec_fn=_preexec(netns), env=env)
    except subprocess.TimeoutExpired as exc:
        raise CommandError(argv, -1, str(exc.stdout or ""), f"timed out after {timeout}s", netns) from None
    except FileNotFoundError:
        raise CommandError(argv, 127, "", f"{argv[0]}: command not found", netns) from None
    if check and cp.returncode != 0:
        raise CommandError(argv, cp.returncode, cp.stdout, cp.stderr, netns)
    return cp


class Background:
    """A long-running process, stopped by its own PID (process group), never by name."""

    def __init__(self, argv: list[str], *, netns: str | None = None, stdout: Path | None = None,
                 stderr: Path | None = None, env: dict[str, str] | None = None, die_with_parent: bool = False):
        self.argv, self.netns = argv, netns
        self.stdout_path, self.stderr_path = stdout, stderr
        out = open(stdout, "wb") if stdout else subprocess.DEVNULL  # noqa: SIM115 - kept open for the child's life
        err = open(stderr, "wb") if stderr else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                         preexec_fn=_preexec(netns, die_with_parent), env=env)
        finally:
            for f in (out, err):
                if f is not subprocess.DEVNULL:
                    f.close()
        self.pid = self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise HarnessError(f"{' '.join(self.argv)} did not finish within {timeout}s") from None

    def stop(self, sig: int = signal.SIGTERM, grace: float = 3.0) -> int | None:
        """Signal the process group, wait `grace` seconds, then SIGKILL. Returns the exit code."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)
            deadline = time.monotonic() + grace
            while self.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(5)
        return self.proc.returncode

    def wait_for_output(self, text: str, what: str, timeout: float = 10) -> None:
        """Return once `text` is in the process's output; HarnessError naming `what` if it exits
        or `timeout` passes first (with the end of its stderr)."""
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if not self.running() or time.monotonic() > deadline:
                raise HarnessError(f"{what} did not start: {self.errors()[-500:]}")
            time.sleep(0.01)

    def output(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path else ""

    def errors(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path else ""
