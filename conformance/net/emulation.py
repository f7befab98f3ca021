"""Link emulation without netem, and link events on a running network.

Where the kernel has no netem qdisc, `loss=`, `delay=` and `jitter=` of a link are emulated with
netfilter, for each direction of the link, in a chain `<run prefix>-<interface>` holding

  * loss: `-m statistic --mode random --probability p -j DROP`;
  * delay and jitter: `-j NFQUEUE --queue-num N`, served by the namespace's delay line
    (conformance/net/delayline.py: one helper process per namespace, see there).

Where: a direction sent by a router is emulated as it leaves the router (security table,
FORWARD and OUTPUT `-o <interface>`: after the filter and mangle tables, so a middlebox on the
router acts first); a direction sent by an endpoint host is emulated as it arrives at the other
end (raw table, PREROUTING `-i <interface>`, first thing a packet meets). Never in the sending
host itself: a packet held or dropped in its own netfilter hooks is still charged to, or reported
to, the sending socket. Held, it counts against TCP Small Queues (a host's TCP behind a 10 ms
delay line throttled itself to 4.5 Mbit/s here, against 1 Gbit/s with the line at the receiving
end); dropped, it is an error TCP resends at once rather than a loss it must detect and recover
from (a 2 % DROP there cost no retransmission at all), and it is a whole GSO super-packet of up to
64 kB. And never at the receiving host either: `ping` and any SO_TIMESTAMP reader take the kernel's
receive time, stamped before PREROUTING, and would not see the last hop's delay. So the emulation
sits in the routers of the path, as a real link's delay sits between the two ends: captures on
both ends of a link show the packets on the router side of it. Only IP packets are affected (ARP is
not). An accepted packet leaves the table where it was queued (netfilter's NF_ACCEPT goes on to
the next table), so nothing else belongs after these jumps in raw PREROUTING or security FORWARD.

Everything here carries the run prefix (chains, the helpers' names), lives inside our namespaces,
and is registered on the Cleanup stack of the network being built as soon as it exists
(`owned_by`); it also goes with the namespace, and the stale sweep kills a killed run's helpers
with its namespaces (a helper whose owner dies sees its stdin close and exits by itself).

Link events (down/up, blackhole) act on a running network: see conformance.net.network.Network."""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute

from conformance.errors import HarnessError, TopologyError
from conformance.net.cleanup import Cleanup
from conformance.net.delayline import DEFAULT_LIMIT, QUEUE_BASE
from conformance.net.names import run_prefix, run_tmpdir
from conformance.net.nodes import route_request, write_sysctls
from conformance.net.shaping import LinkShape
from conformance.proc import NETNS_DIR, in_netns, run

HELPER = Path(__file__).with_name("delayline.py")  # run by path: it needs the standard library only
FAMILIES = (("iptables-restore", 4), ("ip6tables-restore", 6))
COMMENT = "mptcp-conformance link emulation"
REPLY_TIMEOUT = 10.0

_owner: contextvars.ContextVar[Cleanup | None] = contextvars.ContextVar("link_emulation_owner", default=None)


@contextlib.contextmanager
def owned_by(cleanup: Cleanup) -> Iterator[None]:
    """Everything link emulation creates inside this block registers its undo on `cleanup`."""
    token = _owner.set(cleanup)
    try:
        yield
    finally:
        _owner.reset(token)


def _defer(what: str, fn, *args) -> None:
    cleanup = _owner.get()
    if cleanup is not None:  # under `mn --custom` there is no stack: it all goes with the namespaces
        cleanup.defer(what, fn, *args)


def _gone(netns: str) -> bool:
    return not (NETNS_DIR / netns).exists()


# --- the delay line, seen from its owner -------------------------------------------------------

class DelayLine:
    """The delay-line helper of one namespace, driven through its stdin (see delayline.py)."""

    def __init__(self, netns: str, node: str):
        self.netns, self.node = netns, node
        self.name = f"{run_prefix()}-dl-{node}"
        self.log = run_tmpdir() / f"delayline-{netns}.log"
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(HELPER), "--netns", netns, "--name", self.name],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, start_new_session=True,
                bufsize=0)  # unbuffered: select() on its stdout must see every reply line
        self.pid = self.proc.pid
        try:
            self._expect("ready")
        except BaseException:
            self.stop()
            raise

    def _errors(self) -> str:
        try:
            return self.log.read_text(errors="replace").strip()[-500:]
        except OSError:
            return ""

    def _expect(self, prefix: str | tuple[str, ...]) -> str:
        deadline = time.monotonic() + REPLY_TIMEOUT
        out = self.proc.stdout
        while True:
            left = deadline - time.monotonic()
            ready = select.select([out], [], [], max(left, 0))[0] if left > 0 else []
            if not ready:
                raise HarnessError(f"delay line in {self.netns} (pid {self.pid}) did not answer within "
                                   f"{REPLY_TIMEOUT:g}s; its log: {self._errors() or '(empty)'}")
            line = out.readline().decode(errors="replace").strip()
            if not line:
                raise HarnessError(f"delay line in {self.netns} (pid {self.pid}) exited "
                                   f"(status {self.proc.wait(5)}): {self._errors() or '(no log)'}")
            if line.startswith(prefix):
                return line

    def _ask(self, command: str, prefix: str | tuple[str, ...]) -> str:
        if self.proc.poll() is not None:
            raise HarnessError(f"delay line in {self.netns} (pid {self.pid}) is gone "
                               f"(status {self.proc.returncode}): {self._errors() or '(no log)'}")
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        return self._expect(prefix)

    def add(self, queue: int, delay_ms: float, jitter_ms: float, limit: int, hook: str, ifname: str) -> None:
        reply = self._ask(f"add {queue} {delay_ms:.6f} {jitter_ms:.6f} {limit} {hook} {ifname}", ("ok", "error"))
        if not reply.startswith("ok"):
            raise TopologyError(f"{self.netns}: delay line cannot take queue {queue}: {reply}")

    def stats(self) -> dict:
        """What the helper measured: per queue, packets, their release error, queue drops."""
        return json.loads(self._ask("stats", "stats ").removeprefix("stats "))

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int | None:
        """Close its stdin (it lets waiting packets through and exits), SIGKILL after 3 s."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(5)
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                stream.close()
        return self.proc.returncode


def delay_line(node) -> DelayLine:
    """The delay line of `node`'s namespace, started (and its stop registered) on first use."""
    line = getattr(node, "_mpc_delay_line", None)
    if line is None or not line.running():
        line = DelayLine(node.netns, node.name)
        node._mpc_delay_line = line
        _defer(f"stop the delay line in {node.netns}", line.stop)
    return line


def delay_lines(nodes) -> dict[str, DelayLine]:
    return {n.name: n._mpc_delay_line for n in nodes if getattr(n, "_mpc_delay_line", None) is not None}


# --- loss and delay of one link direction ------------------------------------------------------

@dataclass
class Impairment:
    """Loss and/or delay of one link direction: the packets arriving on `ifname` (hook "in", raw
    PREROUTING) or leaving by it (hook "out", security FORWARD and OUTPUT) in `netns`."""

    netns: str
    ifname: str
    hook: str  # "in" | "out"
    chain: str
    loss: float | None  # percent
    queue: int | None  # NFQUEUE number, when delayed

    @property
    def table(self) -> str:
        return "raw" if self.hook == "in" else "security"

    def _rules(self) -> list[str]:
        rules = []
        if self.loss:
            rules.append(f"-A {self.chain} -m statistic --mode random --probability {self.loss / 100:.8f} -j DROP")
        if self.queue is not None:
            rules.append(f"-A {self.chain} -j NFQUEUE --queue-num {self.queue}")
        return rules

    def _hooks(self, op: str) -> list[str]:
        where = [("PREROUTING", "-i")] if self.hook == "in" else [("FORWARD", "-o"), ("OUTPUT", "-o")]
        return [f'{op} {chain} {flag} {self.ifname} -m comment --comment "{COMMENT}" -j {self.chain}'
                for chain, flag in where]

    def install(self) -> None:
        text = "\n".join([f"*{self.table}", f":{self.chain} - [0:0]", *self._rules(), *self._hooks("-A"),
                          "COMMIT", ""])
        for tool, _ in FAMILIES:
            try:
                run([tool, "--noflush"], netns=self.netns, input=text)
            except HarnessError as exc:
                raise TopologyError(f"{self.netns}/{self.ifname}: cannot install link emulation: {exc}") from None

    def remove(self) -> None:
        if _gone(self.netns):
            return
        text = "\n".join([f"*{self.table}", *self._hooks("-D"), f"-F {self.chain}", f"-X {self.chain}",
                          "COMMIT", ""])
        for tool, _ in FAMILIES:
            run([tool, "--noflush"], netns=self.netns, input=text)


def impair(node, ifname: str, hook: str, shape: LinkShape) -> Impairment | None:
    """Emulate `shape`'s loss, delay and jitter for the packets `node` receives on (hook "in") or
    sends by (hook "out") its interface `ifname`."""
    if not (shape.loss or shape.delay_ms):
        return None
    queue = None
    if shape.delay_ms:
        queue = QUEUE_BASE + 2 * _port_of(node, ifname) + (hook == "out")
        delay_line(node).add(queue, shape.delay_ms, shape.jitter_ms or 0.0, shape.max_queue_size or DEFAULT_LIMIT,
                             hook, ifname)
    imp = Impairment(node.netns, ifname, hook, f"{run_prefix()}-{ifname}", shape.loss, queue)
    imp.install()
    _defer(f"remove link emulation on {node.netns}/{ifname}", imp.remove)
    return imp


def _port_of(node, ifname: str) -> int:
    return next(port for port, intf in node.intfs.items() if intf.name == ifname)


def chains(netns: str, version: int = 4) -> list[str]:
    """The link-emulation and blackhole rules in `netns`, as `<table>: <iptables -S line>`."""
    tool = "iptables" if version == 4 else "ip6tables"
    lines = []
    for table in ("raw", "security"):
        out = run([tool, "-t", table, "-S"], netns=netns).stdout
        lines += [f"{table}: {line}" for line in out.splitlines() if run_prefix() in line or COMMENT in line]
    return lines


# --- link events on a running network ----------------------------------------------------------

def _blackhole_rule(op: str) -> str:
    return f'{op} PREROUTING{" 1" if op == "-I" else ""} -m comment --comment "{run_prefix()} blackhole" -j DROP'


def set_blackhole(netns: str, on: bool) -> None:
    """Drop every IP packet arriving in `netns` (on), or stop doing so (off). Idempotent."""
    if _gone(netns):
        return
    for tool, version in FAMILIES:
        present = any("blackhole" in line for line in chains(netns, version))
        if present == on:
            continue
        text = "\n".join(["*raw", _blackhole_rule("-I" if on else "-D"), "COMMIT", ""])
        run([tool, "--noflush"], netns=netns, input=text)


def set_link_state(netns: str, ifname: str, up: bool, routes: list[dict]) -> None:
    """Set `ifname` administratively up or down. Down keeps its IPv6 addresses (keep_addr_on_down;
    IPv4 ones always stay); up puts back `routes` through it, which the kernel dropped on down."""
    if not up:
        write_sysctls(netns, {f"net/ipv6/conf/{ifname}/keep_addr_on_down": "1"})
    with in_netns(netns):
        ipr = IPRoute()
    try:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            raise HarnessError(f"{netns}: no interface {ifname}")
        index = found[0]
        ipr.link("set", index=index, state="up" if up else "down")
        if up:
            _wait_operstate(ipr, index)
            for route in routes:
                _put_route(ipr, index, route)
    finally:
        ipr.close()


def _wait_operstate(ipr: IPRoute, index: int, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ipr.get_links(index)[0].get_attr("IFLA_OPERSTATE") == "UP":
            return
        time.sleep(0.01)


def _put_route(ipr: IPRoute, index: int, route: dict) -> None:
    """One route of the topology plan (the form NetnsNode.config adds), replaced if present."""
    ipr.route("replace", **route_request(route, index))
