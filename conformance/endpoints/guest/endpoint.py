"""A guest kernel as a case's endpoint: what the Lab does on a local host (configure MPTCP, run
the transfer program, read MIB counters, count established sockets), done through the agent.

Guests are booted once per session and per kernel version (`acquire`), each case then takes a
fresh namespace inside the guest (conformance.endpoints.guest.seat)."""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import json
import math
import re
import shlex
import time
from pathlib import Path

from conformance.endpoints.counters import PREFIXES
from conformance.endpoints.guest import kernels
from conformance.endpoints.guest.seat import IP, Seat
from conformance.endpoints.guest.vm import Guest, GuestError
from conformance.endpoints.linux import MptcpConfig
from conformance.endpoints.transfer import decode_info
from conformance.errors import HarnessError
from conformance.net.shaping import LinkShape, netem_args

_GUESTS: dict[str, Guest] = {}
_FLAG_WORDS = {1: "signal", 2: "subflow", 4: "backup", 8: "fullmesh"}


class Unsupported(Exception):
    """The guest kernel lacks what the case asks for (a sysctl, a path-manager feature)."""


def acquire(version: str, slot: str, nics: int = 1) -> Guest:
    """The session's guest running Debian's kernel `version` in `slot` (the topology node it plays:
    a 6.1 client and a 6.1 server are two guests) with at least `nics` NICs, booted on first use
    (again if a case needs more NICs than it has)."""
    key = f"{version}/{slot}"
    guest = _GUESTS.get(key)
    if guest is not None and guest.proc is not None and guest.proc.running() and guest.nics >= nics:
        return guest
    if guest is not None:
        guest.stop()
    kernel = kernels.fetch(version)
    guest = Guest(kernel, re.sub(r"[^0-9a-z]", "", f"{version}{slot}".lower()), nics=nics)
    try:
        guest.boot()
    except BaseException:
        guest.stop()
        raise
    _GUESTS[key] = guest
    return guest


def booted() -> dict[str, Guest]:
    """version -> a guest of this session running it."""
    return {key.split("/")[0]: guest for key, guest in _GUESTS.items()}


def shutdown() -> None:
    """Stop every guest of this session (at the session's end, and at exit as a safety net)."""
    while _GUESTS:
        _, guest = _GUESTS.popitem()
        guest.stop()


atexit.register(shutdown)


def configure(seat: Seat, cfg: MptcpConfig) -> None:
    """MptcpConfig in the guest's case namespace: sysctls, then `ip mptcp` limits and endpoints."""
    guest = seat.guest
    sysctls = {"net.mptcp.enabled": "1" if cfg.enabled else "0",
               "net.mptcp.checksum_enabled": "1" if cfg.checksum else "0", **cfg.sysctls}
    have = set(guest.sh("ls /proc/sys/net/mptcp").split())
    for key in sysctls:
        if key.startswith("net.mptcp.") and key.removeprefix("net.mptcp.") not in have:
            raise Unsupported(f"Linux {seat.guest.kernel.release} has no sysctl {key}")
    lines = [f"sysctl -qw {k}={v}" for k, v in sysctls.items()]
    limits = [f"{word} {v}" for word, v in (("subflows", cfg.subflows),
                                            ("add_addr_accepted", cfg.add_addr_accepted)) if v is not None]
    if limits:
        lines.append(f"{IP} mptcp limits set " + " ".join(limits))
    for ep in cfg.endpoints:
        words = [IP, "mptcp", "endpoint", "add", str(ipaddress.ip_address(ep.addr))]
        if ep.dev is not None:
            words += ["dev", ep.dev]
        if ep.id is not None:
            words += ["id", str(ep.id)]
        if ep.port is not None:
            words += ["port", str(ep.port)]
        words += [word for bit, word in _FLAG_WORDS.items() if int(ep.flags) & bit]
        lines.append(shlex.join(words))
    guest.script(lines)
    seat.commands += lines


def show_endpoints(seat: Seat) -> list[dict]:
    out = seat.guest.sh(f"{IP} -j mptcp endpoint show", check=False).strip()
    try:
        return json.loads(out) if out else []
    except ValueError:
        return [{"raw": out}]


def read_counters(seat: Seat) -> dict[str, int]:
    """The MIB counters of the guest's case namespace (as conformance.endpoints.counters reads them)."""
    text = seat.guest.sh("cat /proc/net/netstat /proc/net/snmp")
    values: dict[str, int] = {}
    lines = text.splitlines()
    for header, data in zip(lines[::2], lines[1::2], strict=False):
        group, *keys = header.split()
        group = group.rstrip(":")
        if group in PREFIXES:
            for key, num in zip(keys, data.split()[1:], strict=False):
                values[f"{group}{key}"] = int(num)
    return values


def established(seat: Seat, port: int) -> int:
    """TCP sockets (subflows included) in ESTABLISHED to or from `port`, from /proc/net/tcp{,6}."""
    text = seat.guest.sh("cat /proc/net/tcp /proc/net/tcp6", check=False)
    count = 0
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4 or parts[3] != "01" or ":" not in parts[1]:
            continue
        local, remote = (int(p.rsplit(":", 1)[1], 16) for p in parts[1:3])
        count += port in (local, remote)
    return count


class GuestProcess:
    """The agent's transfer program running in the guest, with Background's interface; when it
    ends, its report is brought to `report` on this machine (MPTCP_INFO decoded here)."""

    def __init__(self, seat: Seat, tag: str, argv: list[str], report: Path, out: Path, err: Path):
        self.seat, self.tag, self.argv = seat, tag, argv
        self.report, self.out, self.err = report, out, err
        self.remote_report = f"/run/{tag}.json"
        reply = seat.guest.call("bg", f"{tag} {shlex.join([*argv, '--report', self.remote_report])}")
        if reply.rc != 0:
            raise GuestError(f"guest {seat.guest.name}: could not start {argv[:3]}: {reply.text.strip()}")
        self.pid = int(reply.text.strip() or 0)
        self.returncode: int | None = None

    def _poll(self) -> int | None:
        if self.returncode is None:
            reply = self.seat.guest.call("poll", self.tag, timeout=10)
            if reply.rc not in (255,):
                self.returncode = reply.rc
                self._collect()
        return self.returncode

    def running(self) -> bool:
        return self._poll() is None

    def _collect(self) -> None:
        guest = self.seat.guest
        self.out.write_text(guest.sh(f"cat /run/bg/{self.tag}.out", check=False))
        self.err.write_text(guest.sh(f"cat /run/bg/{self.tag}.err", check=False))
        raw = guest.sh(f"cat {self.remote_report}", check=False)
        try:
            report = json.loads(raw)
        except ValueError:
            return  # no report: the Lab says so with the stderr above
        for key in ("mptcp_info", "mptcp_info_mid"):
            hexed = report.pop(f"{key}_raw", None)
            report[key] = decode_info(bytes.fromhex(hexed)) if hexed else None
        report["implementation"] = f"guest {guest.kernel.release}"
        self.report.write_text(json.dumps(report, indent=2))

    def output(self) -> str:
        return self.seat.guest.sh(f"cat /run/bg/{self.tag}.out", check=False)

    def errors(self) -> str:
        return self.seat.guest.sh(f"cat /run/bg/{self.tag}.err", check=False)

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while (rc := self._poll()) is None:
            if time.monotonic() > deadline:
                raise HarnessError(f"{' '.join(self.argv[:3])} in guest {self.seat.guest.name} did not finish "
                                   f"within {timeout}s")
            time.sleep(0.05)
        return rc

    def wait_for_output(self, text: str, what: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if self._poll() is not None or time.monotonic() > deadline:
                raise HarnessError(f"{what} did not start: {self.errors()[-500:]}")
            time.sleep(0.02)

    def stop(self, sig: int = 15, grace: float = 3.0) -> int | None:
        if self._poll() is None:
            with contextlib.suppress(GuestError, TimeoutError):
                self.seat.guest.call("kill", f"{self.tag} {sig}", timeout=5)
                deadline = time.monotonic() + grace
                while self._poll() is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                if self._poll() is None:
                    self.seat.guest.call("kill", f"{self.tag} 9", timeout=5)
                    self.wait(5)
        return self.returncode


def start_transfer(seat: Seat, tag: str, args: list[str], folder: Path, role: str) -> GuestProcess:
    """`agent transfer` with the arguments the Lab gives the local transfer program (its
    --report and --save-mismatch paths are the guest's own)."""
    args = list(args)
    for flag in ("--report", "--save-mismatch"):
        if flag in args:
            i = args.index(flag)
            del args[i:i + 2]
    return GuestProcess(seat, tag, ["/sbin/agent", "transfer", *args], folder / f"{role}.json",
                        folder / f"{role}.out", folder / f"{role}.err")



def emulate_path(seat: Seat, shape: LinkShape) -> list[str]:
    """netem in a guest router: each interface's egress carries, for its direction, what the two
    links of the path would (delay summed, jitter root-sum-square, loss compounded); a router
    only forwards, so every packet of the path crosses exactly one of these qdiscs each way."""
    if not shape.needs_netem:
        return []
    if not seat.guest.kernel.has_netem():
        raise Unsupported(f"Linux {seat.guest.kernel.release} has no netem")
    one_way = LinkShape(delay_ms=2 * shape.delay_ms if shape.delay_ms else None,
                        jitter_ms=math.sqrt(2) * shape.jitter_ms if shape.jitter_ms else None,
                        loss=100 * (1 - (1 - shape.loss / 100) ** 2) if shape.loss else None,
                        max_queue_size=shape.max_queue_size or 10_000)
    lines = [f"/usr/sbin/tc qdisc replace dev {intf} root {' '.join(netem_args(one_way))}"
             for intf in seat.interfaces]
    seat.guest.script(lines)
    seat.commands += lines
    return lines
