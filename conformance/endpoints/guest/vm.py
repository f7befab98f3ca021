"""A booted guest: qemu-system-x86_64 running one of Debian's kernels with our initramfs, its NICs
as tap devices, and a virtio-serial control port to the agent inside.

Each guest lives in a network namespace of its own (`<run prefix>-vm-<name>`): qemu runs there,
its taps are created there and return there between cases. So the sweep of a killed run's
namespaces (conformance.net.names) also kills its qemu and removes its taps, and qemu dies
with the process that started it (PR_SET_PDEATHSIG), even on kill -9."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import netns as pr_netns

from conformance.endpoints.guest import initramfs, kernels
from conformance.errors import HarnessError
from conformance.net.names import netns_name, remove_netns, run_tmpdir
from conformance.proc import Background, run

QEMU = "qemu-system-x86_64"
QBOOT = Path("/usr/share/qemu/qboot.rom")  # in Debian's qemu-system-data
NICS = 1  # by default; a guest is booted with as many as the node it plays has (each costs ~0.5 s of boot)
# What a kernel prints when it breaks: a case whose guest printed one of these fails.
OOPS = re.compile(r"(Oops:|BUG:|WARNING:|Kernel panic|Call Trace:|general protection fault|kernel BUG at)")
BOOT_TIMEOUT = {"kvm": 10.0, "tcg": 60.0}


class GuestError(HarnessError):
    """The guest or its agent did not do what it was asked."""


def kvm_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def _accel_record() -> Path:
    return kernels.cache_dir() / "accelerator.json"


def accelerator(kernel: kernels.Kernel) -> str:
    """kvm if it boots this kernel on this machine, else tcg; detected once (a KVM boot that does
    not reach the agent in time means KVM cannot run it, e.g. a nested PVM /dev/kvm) and kept."""
    record = _accel_record()
    key = f"{os.uname().release} {kernel.release}"
    known = {}
    with contextlib.suppress(OSError, ValueError):
        known = json.loads(record.read_text())
    if key in known:
        return known[key]["accelerator"]
    accel, why = "tcg", "no usable /dev/kvm"
    if kvm_usable():
        try:
            with Guest(kernel, "probe", accel="kvm", nics=0, boot_timeout=BOOT_TIMEOUT["kvm"]) as g:
                accel, why = "kvm", f"booted to ready in {g.boot_seconds:.2f} s"
        except GuestError as exc:
            why = f"a KVM boot did not reach the agent: {str(exc)[:200]}"
    known[key] = {"accelerator": accel, "why": why, "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps(known, indent=2))
    tmp.replace(record)
    return accel


def accelerator_known(kernel_release: str) -> dict | None:
    """What detection found for a kernel, without booting anything (for `doctor`)."""
    with contextlib.suppress(OSError, ValueError):
        return json.loads(_accel_record().read_text()).get(f"{os.uname().release} {kernel_release}")
    return None


@dataclass
class Reply:
    rc: int
    output: bytes

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")


class Guest:
    """One booted guest kernel. `with Guest(...) as g:` boots it and always stops it."""

    def __init__(self, kernel: kernels.Kernel, name: str, *, accel: str | None = None, nics: int = NICS,
                 memory_mb: int = 256, boot_timeout: float | None = None):
        self.kernel, self.name, self.nics = kernel, name, nics
        self.accel = accel or accelerator(kernel)
        self.memory_mb = memory_mb
        self.boot_timeout = boot_timeout or BOOT_TIMEOUT[self.accel]
        self.home = netns_name(f"vm-{name}")
        self.folder = run_tmpdir() / f"vm-{name}"
        self.console = self.folder / "console.log"
        self.proc: Background | None = None
        self.sock: socket.socket | None = None
        self._buf = b""
        self._ids = iter(range(1, 1 << 31))
        self.boot_seconds: float | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> Guest:
        try:
            self.boot()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def tap(self, i: int) -> str:
        return f"vm{i}"

    def mac(self, i: int) -> str:
        """NIC i's MAC at boot: how the agent's side tells the NICs apart."""
        return f"52:54:00:5a:00:{i:02x}"

    def argv(self, image: Path) -> list[str]:
        # Under TCG the plainest machine boots fastest (pc, qemu64: 4.2 s against 5.0 s for q35, max).
        cpu = "host" if self.accel == "kvm" else "qemu64"
        argv = [QEMU, "-machine", f"pc,accel={self.accel}", "-cpu", cpu, "-smp", "1", "-m", str(self.memory_mb),
                # qboot, not SeaBIOS: a minimal firmware that jumps to the kernel (~0.7 s less under TCG).
                *(["-bios", str(QBOOT)] if QBOOT.exists() else []),
                "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-serial", f"file:{self.console}",
                "-kernel", self.kernel.vmlinux or self.kernel.vmlinuz, "-initrd", str(image),
                # loglevel=5: warnings (a WARN's splat) reach the console, boot chatter does not.
                # The rest skips what a guest never uses and costs time under emulation (crypto
                # self-tests, keyboard probing, LSMs, audit, the TSC watchdog): 6.12 boots ~1 s sooner.
                "-append", "console=ttyS0 loglevel=5 panic=-1 mitigations=off cryptomgr.notests i8042.noaux "
                           "i8042.nokbd i8042.nopnp apparmor=0 audit=0 nowatchdog tsc=reliable no_timer_check",
                "-device", "virtio-serial-pci",
                "-chardev", f"socket,id=ctl,path={self.folder / 'ctl.sock'},server=on,wait=off",
                "-device", "virtserialport,chardev=ctl,name=ctl"]
        for i in range(self.nics):
            argv += ["-netdev", f"tap,id=n{i},ifname={self.tap(i)},script=no,downscript=no",
                     "-device", f"virtio-net-pci,netdev=n{i},mac={self.mac(i)}"]
        return argv

    def boot(self) -> None:
        image = initramfs.build(self.kernel)
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in ("ctl.sock", "console.log"):
            (self.folder / stale).unlink(missing_ok=True)
        pr_netns.create(self.home)
        t0 = time.monotonic()
        self.proc = Background(self.argv(image), netns=self.home, stdout=self.folder / "qemu.out",
                               stderr=self.folder / "qemu.err", die_with_parent=True)
        deadline = t0 + self.boot_timeout
        while self.sock is None:
            if not self.proc.running():
                raise GuestError(f"qemu for {self.kernel.release} exited: {self.proc.errors()[-300:]}")
            if time.monotonic() > deadline:
                raise GuestError(f"{self.kernel.release} ({self.accel}) opened no control port within "
                                 f"{self.boot_timeout:.0f} s; console: {self.console_text()[-300:]!r}")
            with contextlib.suppress(OSError):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(str(self.folder / "ctl.sock"))
                self.sock = s
            time.sleep(0.02)
        # The port is open as soon as qemu runs; the agent answers once the guest has booted.
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise GuestError(f"{self.kernel.release} ({self.accel}) did not reach its agent within "
                                 f"{self.boot_timeout:.0f} s; console: {self.console_text()[-400:]!r}")
            try:
                if self.call("ping", timeout=min(left, 0.5)).text == "pong":
                    break
            except TimeoutError:
                pass
            except OSError as exc:  # qemu went away (it closes the port as it exits)
                time.sleep(0.2)
                raise GuestError(f"qemu for {self.kernel.release} ({self.accel}) closed the control port "
                                 f"({exc}): {self.proc.errors()[-300:] or self.console_text()[-300:]}") from None
            self._buf = b""  # a half-read answer to a timed-out ping is dropped with it
        self.boot_seconds = time.monotonic() - t0

    def stop(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError, TimeoutError, GuestError):
                self.call("quit", timeout=1)
            self.sock.close()
            self.sock = None
        if self.proc is not None:
            self.proc.stop(grace=2)
            self.proc = None
        remove_netns(self.home)

    # -- the agent ----------------------------------------------------------------------------
    def call(self, verb: str, rest: str = "", *, timeout: float = 30) -> Reply:
        """One request to the agent and its reply."""
        if self.sock is None:
            raise GuestError(f"guest {self.name} is not running")
        if "\n" in rest:
            raise ValueError("an agent request is one line")
        rid = next(self._ids)
        self.sock.sendall(f"{rid} {verb} {rest}".rstrip().encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            header, sep, body = self._buf.partition(b"\n")
            if sep:
                m = re.fullmatch(rb"=(\d+) (-?\d+) (\d+)", header)
                if m is None:
                    raise GuestError(f"guest {self.name}: malformed agent reply {header[:80]!r}")
                size = int(m.group(3))
                if len(body) >= size:
                    self._buf = body[size:]
                    if int(m.group(1)) != rid:  # the answer to a request that timed out earlier
                        continue
                    return Reply(int(m.group(2)), body[:size])
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"guest {self.name}: no answer to {verb!r} within {timeout:.0f} s")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 16)
            except TimeoutError:
                continue
            if not chunk:
                raise GuestError(f"guest {self.name}: the control port closed; console: "
                                 f"{self.console_text()[-400:]!r}")
            self._buf += chunk

    def sh(self, command: str, *, timeout: float = 30, check: bool = True) -> str:
        """A shell command in the guest's case namespace; its output (GuestError on failure)."""
        reply = self.call("sh", command.replace("\n", "; ") if "\n" in command else command, timeout=timeout)
        if check and reply.rc != 0:
            raise GuestError(f"guest {self.name} ({self.kernel.release}): `{command[:200]}` exited {reply.rc}: "
                             f"{reply.text.strip()[-300:]}")
        return reply.text

    def script(self, lines: list[str], *, timeout: float = 30) -> str:
        """Several commands at once (one round trip), stopping at the first that fails."""
        return self.sh(" && ".join(f"{{ {line} ; }}" for line in lines), timeout=timeout) if lines else ""

    def fresh_namespace(self) -> None:
        """The state reset between cases: a new network namespace in the guest, every NIC moved in
        (sysctls, counters, endpoints, routes and sockets of the last case go with the old one)."""
        reply = self.call("netns", timeout=20)
        if reply.rc != 0:
            raise GuestError(f"guest {self.name}: no fresh namespace: {reply.text.strip()[-300:]}")

    def console_text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except OSError:
            return ""

    def console_size(self) -> int:
        try:
            return self.console.stat().st_size
        except OSError:
            return 0

    def uname(self) -> str:
        return self.sh("uname -r").strip()


def oopses(console: str) -> list[str]:
    """The lines of a console log that say the kernel broke."""
    return [line.strip() for line in console.splitlines() if OOPS.search(line)]


def qemu_available() -> bool:
    return run(["which", QEMU], check=False).returncode == 0
