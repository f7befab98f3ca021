"""Our engine for packetdrill scripts: scapy packets over a TUN device, the kernel on the other side.

Runs in the network namespace made for one script and variant (conformance.packetdrill.engines
makes it and starts this). The script's side of every connection is played here: inbound
packets (`<`) are built and written to the device at their time, outbound ones (`>`) are read
from it and judged, syscalls run on real sockets in a thread of their own, shell commands run
with packetdrill's OPT_* environment.

Timing follows packetdrill: a relative time counts from the previous event's scheduled time
between two inbound packets, otherwise from when the event comes up; an outbound packet must
arrive within the tolerance of its time; a call written `a...b` blocks from a to b while the
events after it run.

Two modes. `strict` judges like packetdrill: every field the script gives, option order and
padding, flags including PSH, timing. `rfc` judges what RFC 8684 requires and reports, rather
than fails on, what it lets differ: an extra or reordered pure ACK or ADD_ADDR, a DSS that only
acknowledges where the script has one or none, option order and padding, timing, PSH."""

from __future__ import annotations

import copy
import fcntl
import ipaddress
import os
import queue
import select
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from conformance.packetdrill.dialect import SUBTYPE_OF, Endpoint, Flow, State, render
from conformance.packetdrill.outcome import Outcome
from conformance.packetdrill.script import Event, Packet, Script, ScriptError, Syscall
from conformance.packetdrill.syscalls import SyscallMismatch, Syscalls, expected_result
from conformance.packetdrill.variants import DEVICE, PORT, Variant
from conformance.wire import MPTCPOption, mptcp_options

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
FLAG_BITS = {"F": 0x01, "S": 0x02, "R": 0x04, "P": 0x08, ".": 0x10, "U": 0x20, "E": 0x40, "W": 0x80}
M32 = 2**32 - 1
RFC_GRACE_S = 1.0  # rfc mode waits this much past a line's window: timing is not RFC 8684's
REMOTE_PORT = 40000  # the script side's first port (new subflows count up)


class Failed(Exception):
    """The script failed at an event: `kind` mismatch, timing, syscall, timeout or command."""

    def __init__(self, kind: str, event: Event | None, message: str, *, expected: str = "", seen: str = "",
                 recent: list[str] | None = None) -> None:
        super().__init__(message)
        self.kind, self.event, self.message = kind, event, message
        self.expected, self.seen, self.recent = expected, seen, recent or []


@dataclass
class Live:
    """A packet the kernel sent, with when it was read from the device."""

    t: float
    pkt: Any  # scapy IP or IPv6
    seen_by: list[int] = field(default_factory=list)  # rfc mode: lines matched past it, or that it served
    flags_used: bool = False  # rfc mode: a FIN/ACK that stood for an ACK line too, kept for the FIN line

    @property
    def tcp(self):
        return self.pkt[TCP]


def flag_string(bits: int) -> str:
    out = "".join(k for k, b in FLAG_BITS.items() if bits & b and k != ".")
    return out + ("." if bits & 0x10 else "")


def flag_bits(flags: str) -> int:
    bits = 0
    for ch in flags:
        bits |= FLAG_BITS.get(ch, 0)
        if ch == "C":
            bits |= 0x80
    return bits


class Device:
    """The TUN device the kernel's packets for the remote network go to, and ours come from."""

    def __init__(self, variant: Variant) -> None:
        from pyroute2 import IPRoute

        self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        fcntl.ioctl(self.fd, TUNSETIFF, struct.pack("16sH", DEVICE.encode(), IFF_TUN | IFF_NO_PI))
        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            ipr.link("set", index=lo, state="up")
            idx = ipr.link_lookup(ifname=DEVICE)[0]
            if variant.wire_v6:
                Path(f"/proc/sys/net/ipv6/conf/{DEVICE}/accept_dad").write_text("0")
                Path(f"/proc/sys/net/ipv6/conf/{DEVICE}/router_solicitations").write_text("0")
            if variant.mtu:
                ipr.link("set", index=idx, mtu=variant.mtu)
            ip, plen = variant.local_cidr().split("/")
            ipr.addr("add", index=idx, address=ip, prefixlen=int(plen))
            ipr.link("set", index=idx, state="up")
            net = ipaddress.ip_network(f"{variant.remote_ip}/{variant.prefix}", strict=False)
            ipr.route("add", dst=str(net.network_address), dst_len=net.prefixlen, oif=idx)
        self.queue: queue.Queue[Live] = queue.Queue()
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, name="tun-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.fd], [], [], 0.05)
            if not ready:
                continue
            try:
                raw = os.read(self.fd, 65536)
            except BlockingIOError:
                continue
            except OSError:
                return
            now = time.monotonic()
            pkt = IPv6(raw) if raw[0] >> 4 == 6 else IP(raw)
            if TCP in pkt:  # neighbour discovery and the like are not the script's business
                self.queue.put(Live(now, pkt))

    def send(self, pkt) -> None:
        os.write(self.fd, bytes(pkt))

    def close(self) -> None:
        self._stop.set()
        self._reader.join(timeout=1)
        os.close(self.fd)


class Interpreter:
    def __init__(self, script: Script, variant: Variant, mode: str = "strict") -> None:
        self.script, self.variant, self.mode = script, variant, mode
        self.strict = mode == "strict"
        self.tolerance = script.tolerance
        self.state = State()
        self.flows: dict[tuple[Endpoint, Endpoint], Flow] = {}
        # The subflow lines without a tuple are on (packetdrill's socket under test): the one the
        # latest SYN opened, whichever way; a line naming its tuple does not move it.
        self.under_test: Flow | None = None
        self.remote_count = 0
        # script TS val -> the kernel's, per subflow (Linux gives each subflow its own TS offset)
        self.ts_map: dict[tuple[Endpoint, Endpoint] | None, dict[int, int]] = {}
        self.tolerated: list[str] = []
        self.recent: list[str] = []  # the last packets either way, for a timeout's message
        self.pending: list[Live] = []  # rfc mode: kernel packets set aside (reordered)
        self.matched: list[Live] = []
        self.syscalls = Syscalls(variant)
        self.blocking: tuple[threading.Thread, Event, dict] | None = None
        self.events = list(script.events)

    # -- addresses -----------------------------------------------------------------------------
    def default_local(self) -> Endpoint:
        return Endpoint(str(ipaddress.ip_address(self.variant.local_ip)), PORT)

    def new_remote(self, port: int | None = None) -> Endpoint:
        """A further address of the script's side: the next one up from the highest in use
        (packetdrill's rule), with a port of its own."""
        base = ipaddress.ip_address(self.variant.remote_ip)
        used = {ipaddress.ip_address(f.remote.ip) for f in self.flows.values()}
        used |= {ipaddress.ip_address(e.ip) for e in self.state.addrs.values()}
        net = ipaddress.ip_network(f"{self.variant.remote_ip}/{self.variant.prefix}", strict=False)
        used = {u for u in used if u.version == base.version and u in net and u >= base}
        ip = max(used) + 1 if used else base
        ep = Endpoint(str(ip), port or REMOTE_PORT + self.remote_count)
        self.remote_count += 1
        return ep

    def flow(self, local: Endpoint, remote: Endpoint) -> Flow:
        key = (local, remote)
        if key not in self.flows:
            self.flows[key] = Flow(local, remote)
        return self.flows[key]

    # -- running -------------------------------------------------------------------------------
    def run(self) -> Outcome:
        start = time.monotonic()
        self.device = Device(self.variant)
        self.t0 = time.monotonic()
        try:
            # Commands before the first timed event set the stage; the script's clock starts after them.
            while self.events and self.events[0].time is None:
                self._command(self.events.pop(0))
            self.t0 = time.monotonic()
            self._run_events()
            self._finish_blocking()
            if not self.strict:
                self._finish_rfc()
            return Outcome("pass", tolerated=self.tolerated, seconds=time.monotonic() - start)
        except Failed as f:
            verdict = "error" if f.kind == "script" else "fail"  # the script is wrong, not the kernel
            return Outcome(verdict, f.event.line if f.event else None, f.kind, f.message, f.expected, f.seen,
                           f.recent or self.recent[-6:], self.tolerated, time.monotonic() - start)
        finally:
            self.syscalls.close_all()
            self.device.close()

    def _run_events(self) -> None:
        last: Event | None = None
        last_t = 0.0
        for ev in self.events:
            if ev.time is None:
                self._command(ev)
                continue
            t = self._schedule(ev, last, last_t)
            action = ev.action
            if isinstance(action, Packet) and action.direction == "<":
                self._sleep_until(t)
                self._inbound(ev, action)
            elif isinstance(action, Packet):
                self._outbound(ev, action, t)
            elif isinstance(action, Syscall):
                self._syscall(ev, action, t)
            else:
                self._sleep_until(t)
                self._command(ev)
            last, last_t = ev, t

    def _schedule(self, ev: Event, last: Event | None, last_t: float) -> float:
        """The event's time in seconds since the script started."""
        tm = ev.time
        if tm.kind == "any":
            return self.now()
        if not tm.relative:
            return tm.start
        anchored = (last is not None and _is_inbound(last) and _is_inbound(ev))
        return (last_t if anchored else self.now()) + tm.start

    def now(self) -> float:
        return time.monotonic() - self.t0

    def _sleep_until(self, t: float) -> None:
        delay = t - self.now()
        if delay > 0:
            time.sleep(delay)

    def _end_of(self, ev: Event, t: float) -> float:
        """When a window or a blocking call ends (its start for a point in time)."""
        tm = ev.time
        if tm.kind not in ("window", "blocking") or tm.end is None:
            return t
        offset = t - tm.start if tm.relative else 0.0
        return offset + tm.end if tm.end_relative else tm.end

    # -- commands ------------------------------------------------------------------------------
    def _command(self, ev: Event) -> None:
        env = {**os.environ, **self.variant.environment(int(self.tolerance * 1e6))}
        try:
            r = subprocess.run(["/bin/sh", "-c", ev.action.text], cwd=self.script.path.parent or ".", env=env,
                               capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            raise Failed("command", ev, f"command `{ev.action.text}` did not finish in 60 s") from None
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
            raise Failed("command", ev, f"command `{ev.action.text}` failed with exit {r.returncode}: "
                         + " | ".join(tail))

    # -- syscalls ------------------------------------------------------------------------------
    def _syscall(self, ev: Event, call: Syscall, t: float) -> None:
        self._finish_blocking()
        self._sleep_until(t)
        box: dict = {}

        def go() -> None:
            try:
                box["result"] = self.syscalls.run(call)
            except BaseException as exc:  # judged by the main thread
                box["error"] = exc
            box["end"] = self.now()

        th = threading.Thread(target=go, name=f"syscall-{call.name}", daemon=True)
        th.start()
        box["t_end"] = self._end_of(ev, t)
        if ev.time.kind == "blocking":
            self.blocking = (th, ev, box)
            return
        th.join(self.tolerance + 0.05)
        if th.is_alive():
            th.join(10)
            if th.is_alive():
                raise Failed("syscall", ev, f"{call.name}() blocked; the script expects it to return at once "
                             f"(write `{ev.time.start}...END {call.name}(...)` for a blocking call)")
        self._judge_call(ev, call, box)

    def _finish_blocking(self) -> None:
        if self.blocking is None:
            return
        th, ev, box = self.blocking
        self.blocking = None
        th.join(30)
        if th.is_alive():
            raise Failed("syscall", ev, f"{ev.action.name}() still blocked 30 s after it should have returned")
        self._judge_call(ev, ev.action, box)

    def _judge_call(self, ev: Event, call: Syscall, box: dict) -> None:
        if "error" in box:
            exc = box["error"]
            if isinstance(exc, SyscallMismatch):
                raise Failed("syscall", ev, f"{call.name}(): {exc}")
            if isinstance(exc, ScriptError):
                raise Failed("syscall", ev, f"{call.name}(): {exc}")
            raise Failed("syscall", ev, f"{call.name}(): {type(exc).__name__}: {exc}")
        got, errno_name, _ = box["result"]
        want = expected_result(call)
        if call.name in ("socket", "accept") and got >= 0 and isinstance(want, int) and want >= 0:
            pass  # a new descriptor: the script's number names it
        elif got != want or (errno_name or None) != (call.errno or None):
            exp = f"{want}" + (f" {call.errno}" if call.errno else "")
            seen = f"{got}" + (f" {errno_name}" if errno_name else "")
            raise Failed("syscall", ev, f"{call.name}() returned {seen}, expected {exp}", expected=ev.source,
                         seen=f"{call.name}(...) = {seen}")
        t_end = box["t_end"]
        if ev.time.kind == "blocking":
            if not t_end - self.tolerance <= box["end"] <= t_end + self.tolerance:
                self._timing(ev, f"{call.name}() returned at {box['end']:.6f} s, expected at {t_end:.6f} s")
        elif ev.time.kind != "any" and box["end"] > t_end + self.tolerance:
            self._timing(ev, f"{call.name}() returned at {box['end']:.6f} s, expected by "
                         f"{t_end + self.tolerance:.6f} s")

    def _timing(self, ev: Event, message: str) -> None:
        if self.strict:
            raise Failed("timing", ev, f"timing error: {message}; tolerance {self.tolerance:.6f} s")
        self.tolerated.append(f"line {ev.line}: timing: {message}")

    # -- inbound packets -----------------------------------------------------------------------
    def _resolve_inbound(self, p: Packet) -> Flow:
        addrs = self.state.addrs
        if p.src is None and p.dst is None:
            if self.under_test is None:
                self.under_test = self.flow(self.default_local(), self.new_remote())
            return self.under_test
        local = addrs.get(p.dst) if p.dst else None
        remote = addrs.get(p.src) if p.src else None
        base = self.under_test
        if p.dst and local is None:
            local = base.local if base else self.default_local()
            addrs[p.dst] = local
        if local is None:
            local = base.local if base else self.default_local()
        if p.src and remote is None:
            remote = self.new_remote()
            addrs[p.src] = remote
        if remote is None:
            known = [f for f in self.flows.values() if f.local == local]
            remote = known[-1].remote if known else (base.remote if base else self.new_remote())
        fl = self.flow(local, remote)
        if self.under_test is None or (set(p.flags) & {"S"} and "." not in p.flags):
            self.under_test = fl
        return fl

    def _inbound(self, ev: Event, p: Packet) -> None:
        try:
            fl = self._resolve_inbound(p)
            bits = flag_bits(p.flags)
            if bits & 0x02 and not bits & 0x10:
                fl.remote_isn = p.seq
            # Like packetdrill, the ack field moves into the kernel's sequence space even when the
            # script leaves it at 0: a segment acknowledging nothing still gets a RST at that point.
            ack = ((p.ack or 0) + (fl.local_isn or 0)) & M32 if bits & 0x10 or p.ack else 0
            opts: list = []
            for o in p.options or []:
                opts.append(self._tcp_option(o, fl, p))
        except ScriptError as exc:
            raise Failed("script", ev, str(exc)) from None
        ipl = IPv6 if self.variant.wire_v6 else IP
        tcp = TCP(sport=fl.remote.port, dport=fl.local.port, flags=bits, seq=p.seq & M32, ack=ack,
                  window=p.win if p.win is not None else 65535, options=opts)
        pkt = ipl(src=fl.remote.ip, dst=fl.local.ip) / tcp / bytes(p.length)
        size = len(bytes(tcp)) - 20 - p.length
        if size > 40:  # an IPv6 address in an ADD_ADDR can push a line past what fits
            raise Failed("script", ev, f"the TCP options take {size} bytes in the {self.variant.name} variant, "
                         "more than the 40 TCP allows")
        self.device.send(pkt)
        self._note("<", pkt)

    def _tcp_option(self, o, fl: Flow, p: Packet):
        n = o.name
        if n == "nop":
            return ("NOP", None)
        if n == "eol":
            return ("EOL", None)
        if n == "mss":
            return ("MSS", o.fields["value"])
        if n == "wscale":
            return ("WScale", o.fields["value"])
        if n == "sackOK":
            return ("SAckOK", b"")
        if n == "sack":
            return ("SAck", tuple(x for b in o.fields["blocks"] for x in b))
        if n == "TS":
            return ("Timestamp", (o.fields["val"], self._ecr(o.fields["ecr"], fl)))
        return ("MPTCP", self.state.build(o, fl, p.flags, p.seq, p.length, self._new_remote_for_addr))

    def _new_remote_for_addr(self, port: int | None) -> Endpoint:
        ep = self.new_remote(port)
        return Endpoint(ep.ip, port or PORT)

    def _ecr(self, script_ecr: int, fl: Flow) -> int:
        """The kernel's TS val that the script's ecr stands for: the very one if the script named
        it on an outbound line of this subflow, else at the same distance from the first."""
        if script_ecr == 0:
            return 0
        for key in ((fl.local, fl.remote), None):
            seen = self.ts_map.get(key)
            if seen:
                if script_ecr in seen:
                    return seen[script_ecr]
                first_script, first_live = next(iter(seen.items()))
                return (first_live + script_ecr - first_script) & M32
        return script_ecr

    # -- outbound packets ----------------------------------------------------------------------
    def _outbound(self, ev: Event, p: Packet, t: float) -> None:
        end = self._end_of(ev, t)
        deadline = max(end + self.tolerance, self.now())
        if self.strict:
            live = self._next_live(deadline)
            if live is None:
                raise Failed("timeout", ev, f"timed out waiting for the outbound packet of line {ev.line}",
                             expected=ev.source, recent=self.recent[-6:])
            diffs = self._judge(p, live, dry=False)
            if diffs:
                raise Failed("mismatch", ev, "; ".join(diffs), expected=ev.source, seen=self.describe(live))
            self._check_time(ev, live.t - self.t0, t, end)
            return
        self._outbound_rfc(ev, p, t, end, deadline + RFC_GRACE_S)

    def _outbound_rfc(self, ev: Event, p: Packet, t: float, end: float, deadline: float) -> None:
        """Take the first kernel packet that satisfies the line: those set aside earlier first
        (they came early: reordered), then new ones; the rest stay set aside for later lines."""
        i = 0
        while True:
            if i < len(self.pending):
                live = self.pending[i]
            else:
                live = self._next_live(deadline)
                if live is None:
                    break
                self.pending.append(live)
            diffs = self._judge(p, live, dry=True)
            coalesced = diffs == ["flags: expected ., got F."] and not p.length
            if diffs and not coalesced:
                i += 1
                if i > 64:
                    break
                continue
            before = len(self.tolerated)
            self._judge(p, live, dry=False)
            self.tolerated[before:] = [f"line {ev.line}: {n}" for n in self.tolerated[before:] + self.state.notes]
            self.state.notes.clear()
            self.matched.append(live)
            earlier = [x for x in self.pending[:i] if not x.seen_by]
            if coalesced:
                # A pure ACK and the FIN after it sent as one FIN/ACK: TCP lets it. The same
                # segment still stands for the script's FIN line.
                self.tolerated.append(f"line {ev.line}: the ACK came on the kernel's FIN: {self.describe(live)}")
                live.seen_by.append(ev.line)
                live.flags_used = True
            else:
                self.pending.pop(i)
            if earlier:
                self.tolerated.append(f"line {ev.line}: matched past {len(earlier)} earlier kernel packet(s), "
                                      "kept for later lines: " + "; ".join(self.describe(x) for x in earlier))
            for x in earlier:
                x.seen_by.append(ev.line)
            self._check_time(ev, live.t - self.t0, t, end)
            return
        # Nothing satisfied the line. Judge it against the closest kernel packet: one carrying
        # every kind of MPTCP option the line has (an ADD_ADDR with the wrong HMAC, say), else
        # the first the RFC does not allow here; with neither, the line's packet never came.
        kinds = {SUBTYPE_OF[o.name] for o in p.options or [] if o.name in SUBTYPE_OF}
        unmatched = [x for x in self.pending
                     if kinds and kinds <= {type(o) for o in mptcp_options(x.tcp)}]
        unmatched += [x for x in self.pending if not self._tolerable(x) and x not in unmatched]
        if not unmatched:
            raise Failed("timeout", ev, f"timed out waiting for the outbound packet of line {ev.line}",
                         expected=ev.source, recent=self.recent[-6:])
        first = unmatched[0]
        raise Failed("mismatch", ev, "; ".join(self._judge(p, first, dry=True)), expected=ev.source,
                     seen=self.describe(first))

    def _finish_rfc(self) -> None:
        """After the last line: set-aside packets the RFC allows are noted; anything else the
        kernel sent before a later expected packet was never expected by the script."""
        last_matched = max((x.t for x in self.matched), default=None)
        for x in self.pending:
            if x.flags_used:
                continue
            if self._tolerable(x):
                self.tolerated.append(f"extra packet: {self.describe(x)}")
            elif last_matched is not None and x.t < last_matched:
                raise Failed("mismatch", None, f"the kernel sent a packet no line of the script expects: "
                             f"{self.describe(x)}", seen=self.describe(x))

    def _next_live(self, until: float) -> Live | None:
        try:
            live = self.device.queue.get(timeout=max(0.0, until - self.now()))
        except queue.Empty:
            return None
        self._note(">", live.pkt, live.t)
        return live

    def _tolerable(self, live: Live) -> bool:
        """rfc mode: a kernel packet the RFC lets appear where the script has none: a pure ACK
        whose MPTCP options are only a Data ACK, the kernel's own ADD_ADDR, MP_PRIO, or the echo
        of an address the script announced with a valid HMAC; a copy of a segment a line already
        took (a retransmission); an MP_JOIN SYN to the script's
        first address or one it announced validly (when to open subflows is the path manager's
        choice, §3.2; an announcement whose HMAC fails must be ignored, §3.4.1)."""
        tcp, pkt = live.tcp, live.pkt
        opts = mptcp_options(tcp)
        if any(_same_segment(live, m) for m in self.matched):
            return True  # a retransmitted copy of a segment a line already took
        valid = {ip for ip, (_, ok) in self.state.announced.items() if ok}
        if int(tcp.flags) & 0x17 == 0x02 and any(type(o).__name__ == "MPJoinSyn" for o in opts):
            first = [f.remote.ip for f in self.flows.values()][:1]
            return str(pkt.dst) in valid or str(pkt.dst) in first
        if int(tcp.flags) & 0x07 or len(bytes(tcp.payload)):
            return False
        for o in opts:
            name = type(o).__name__
            if name == "DSS" and int(o.flags) & 0x14:
                return False
            if name == "AddAddr" and o.echo and str(o.address) not in valid:
                return False
            if name not in ("DSS", "AddAddr", "MPPrio"):
                return False
        return True

    def _check_time(self, ev: Event, actual: float, t: float, end: float) -> None:
        if ev.time.kind == "any":
            return
        if not (t - self.tolerance <= actual <= end + self.tolerance):
            self._timing(ev, f"expected the outbound packet at {t:.6f} s but it happened at {actual:.6f} s")

    def _resolve_outbound(self, p: Packet, live: Live, dry: bool) -> tuple[Flow | None, list[str]]:
        pkt, tcp = live.pkt, live.tcp
        local, remote = Endpoint(str(pkt.src), tcp.sport), Endpoint(str(pkt.dst), tcp.dport)
        diffs = []
        addrs = self.state.addrs
        for name, ep, side in ((p.src, local, "source"), (p.dst, remote, "destination")):
            if name is None:
                continue
            if name in addrs:
                want = addrs[name]
                if want.ip != ep.ip or (want.port and want.port != ep.port and side == "destination"):
                    diffs.append(f"{side} addr[{name}]: expected {want}, got {ep}")
            elif not dry:
                addrs[name] = ep
        # Strict: a line without a tuple is on the subflow under test. rfc: on any subflow of the
        # connection (which subflow carries a signal is the sender's choice); its numbers still tell.
        test = self.under_test
        if p.src is None and p.dst is None and test is not None and self.strict \
                and (test.local, test.remote) != (local, remote):
            diffs.append(f"subflow: expected {test.local} > {test.remote}, got {local} > {remote}")
        fl = None
        if not diffs and not dry:
            fl = self.flow(local, remote)
            if self.under_test is None or int(tcp.flags) & 0x12 == 0x02:
                self.under_test = fl
        return fl, diffs

    def _judge(self, p: Packet, live: Live, dry: bool) -> list[str]:
        """Differences between the script's outbound packet and `live`; not dry: also learn from it."""
        tcp = live.tcp
        fl, diffs = self._resolve_outbound(p, live, dry)
        if diffs:
            return diffs
        fl = fl or self.flows.get((Endpoint(str(live.pkt.src), tcp.sport), Endpoint(str(live.pkt.dst), tcp.dport)))
        want_bits, got_bits = flag_bits(p.flags), int(tcp.flags)
        mask = 0xFF if self.strict else 0x17  # rfc: PSH, URG, ECN bits are not RFC 8684's business
        if want_bits & mask != got_bits & mask:
            diffs.append(f"flags: expected {p.flags}, got {flag_string(got_bits)}")
        isn = fl.local_isn if fl else None
        if got_bits & 0x02:
            isn = (tcp.seq - p.seq) & M32
        rel_seq = (tcp.seq - isn) & M32 if isn is not None else tcp.seq
        if isn is not None and rel_seq != p.seq & M32:
            diffs.append(f"seq: expected {p.seq}, got {rel_seq}")
        if got_bits & 0x10 and p.ack is not None and tcp.ack != p.ack & M32:
            diffs.append(f"ack: expected {p.ack}, got {tcp.ack}")
        if p.win is not None and self.strict and tcp.window != p.win:
            diffs.append(f"win: expected {p.win}, got {tcp.window}")
        payload = bytes(tcp.payload)
        if len(payload) != p.length:
            diffs.append(f"payload: expected {p.length} bytes, got {len(payload)}")
        elif self.strict and payload != bytes(p.length):
            diffs.append("payload: expected the zero bytes the script wrote, got other bytes")
        if not diffs:
            diffs += self._judge_options(p, live, fl, dry)
        if not diffs and not dry and fl is not None and isn is not None:
            fl.local_isn = isn
        return diffs

    def _judge_options(self, p: Packet, live: Live, fl: Flow | None, dry: bool) -> list[str]:
        if p.any_options:
            return []
        tcp = live.tcp
        got = [(k, v) for k, v in tcp.options if k != "EOL"]
        want = p.options or []
        diffs: list[str] = []
        state = copy.deepcopy(self.state) if dry else self.state  # a dry judgment binds nothing
        flow = fl or Flow(Endpoint(str(live.pkt.src), tcp.sport), Endpoint(str(live.pkt.dst), tcp.dport))
        if dry:
            flow = copy.deepcopy(flow)
        if self.strict:
            kinds_w = [_kind(o.name) for o in want]
            kinds_g = [_kind_live(k, v) for k, v in got]
            if kinds_w != kinds_g:
                return [f"options: expected <{', '.join(kinds_w)}>, got <{', '.join(kinds_g)}>"]
            pairs = list(zip(want, got, strict=True))
        else:
            pairs = []
            live_mptcp = [(k, v) for k, v in got if k == "MPTCP" and isinstance(v, MPTCPOption)]
            for o in want:
                if o.name not in SUBTYPE_OF:
                    continue
                cls = SUBTYPE_OF[o.name]
                match = next(((k, v) for k, v in live_mptcp if isinstance(v, cls)), None)
                if match is None:
                    if o.name == "dss" and "dsn" not in o.fields and not o.fields.get("fin"):
                        # a Data ACK alone is never required on a given segment (§3.3.2)
                        if not dry:
                            self.tolerated.append("the script's DSS carrying only a Data ACK is not on "
                                                  f"{self.describe(live)}")
                        continue
                    diffs.append(f"options: expected {o.name}, got none")
                    continue
                live_mptcp.remove(match)
                pairs.append((o, match))
            for _, v in live_mptcp:
                name = type(v).__name__
                if name == "DSS" and not int(v.flags) & 0x14:
                    if not dry:
                        self.tolerated.append(f"a DSS carrying only a Data ACK the script does not have: "
                                              f"{render(v, self.state)}")
                    continue
                if name in ("AddAddr", "MPPrio"):
                    if not dry:
                        self.tolerated.append(f"an extra {render(v, self.state)}")
                    continue
                diffs.append(f"options: unexpected {render(v, state)}")
        payload = bytes(tcp.payload)
        for o, (k, v) in pairs:
            if o.name in SUBTYPE_OF:
                if not isinstance(v, SUBTYPE_OF[o.name]):
                    got_text = render(v, state) if isinstance(v, MPTCPOption) else k
                    diffs.append(f"options: expected {o.name}, got {got_text}")
                    continue
                try:
                    diffs += state.judge(o, v, flow, flag_string(int(tcp.flags)), strict=self.strict,
                                         payload=payload)
                except ScriptError as exc:
                    diffs.append(str(exc))
            elif o.name in ("mss", "wscale"):
                if o.fields["value"] != v:
                    diffs.append(f"{o.name}: expected {o.fields['value']}, got {v}")
            elif o.name == "sack":
                want_blocks = tuple(x for b in o.fields["blocks"] for x in b)
                if tuple(v) != want_blocks:
                    diffs.append(f"sack: expected {want_blocks}, got {tuple(v)}")
        if not dry:
            # The script's TS values stand for the kernel's: remember which is which, so its ecr
            # echoes the right one (either mode: a wrong ecr gets the script's packets dropped).
            want_ts = next((o.fields["val"] for o in want if o.name == "TS"), None)
            got_ts = next((v[0] for k, v in got if k == "Timestamp"), None)
            if want_ts is not None and got_ts is not None:
                for key in ((flow.local, flow.remote), None):
                    self.ts_map.setdefault(key, {})[want_ts] = got_ts
        return diffs

    # -- messages ------------------------------------------------------------------------------
    def _note(self, direction: str, pkt, t: float | None = None) -> None:
        when = (t if t is not None else time.monotonic()) - self.t0
        self.recent.append(f"{when:.3f} {self._line(direction, pkt)}")
        del self.recent[:-20]

    def describe(self, live: Live) -> str:
        return self._line(">", live.pkt)

    def _line(self, direction: str, pkt) -> str:
        """A packet as a script line would write it (kernel sequence numbers relative to its ISN)."""
        tcp = pkt[TCP]
        if direction == ">":
            local, remote = Endpoint(str(pkt.src), tcp.sport), Endpoint(str(pkt.dst), tcp.dport)
        else:
            local, remote = Endpoint(str(pkt.dst), tcp.dport), Endpoint(str(pkt.src), tcp.sport)
        fl = self.flows.get((local, remote))
        bits = int(tcp.flags)
        n = len(bytes(tcp.payload))
        if direction == ">":
            isn = fl.local_isn if fl and fl.local_isn is not None else (tcp.seq if bits & 0x02 else None)
            seq = (tcp.seq - isn) & M32 if isn is not None else tcp.seq
            ack = tcp.ack
        else:
            seq = tcp.seq
            ack = (tcp.ack - fl.local_isn) & M32 if fl and fl.local_isn is not None else tcp.ack
        opts = []
        for k, v in tcp.options:
            if k == "MPTCP" and isinstance(v, MPTCPOption):
                opts.append(render(v, self.state))
            elif k == "Timestamp":
                opts.append(f"TS val {v[0]} ecr {v[1]}")
            elif k in ("NOP", "EOL"):
                opts.append(k.lower())
            elif k == "SAckOK":
                opts.append("sackOK")
            elif k == "MSS":
                opts.append(f"mss {v}")
            elif k == "WScale":
                opts.append(f"wscale {v}")
            else:
                opts.append(f"{k} {v}")
        src, dst = (local, remote) if direction == ">" else (remote, local)
        line = (f"{direction} {src} > {dst} {flag_string(bits)} "
                f"{seq}:{(seq + n) & M32}({n})" + (f" ack {ack}" if bits & 0x10 else "") + f" win {tcp.window}")
        return line + (f" <{', '.join(opts)}>" if opts else "")


def _same_segment(a: Live, b: Live) -> bool:
    def key(x: Live) -> tuple:
        t = x.tcp
        return (str(x.pkt.src), str(x.pkt.dst), t.sport, t.dport, t.seq, t.ack, int(t.flags), bytes(t.payload),
                [bytes(o) for o in mptcp_options(t)])

    return key(a) == key(b)


def _is_inbound(ev: Event) -> bool:
    return isinstance(ev.action, Packet) and ev.action.direction == "<"


def _kind(name: str) -> str:
    return "mptcp" if name in SUBTYPE_OF else name


def _kind_live(k: str, v: Any) -> str:
    return {"NOP": "nop", "EOL": "eol", "MSS": "mss", "WScale": "wscale", "SAckOK": "sackOK", "SAck": "sack",
            "Timestamp": "TS", "MPTCP": "mptcp"}.get(k, str(k))


def run_script(script: Script, variant: Variant, mode: str) -> Outcome:
    return Interpreter(script, variant, mode).run()


