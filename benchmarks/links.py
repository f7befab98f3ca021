"""Link emulation: goodput over shaped paths, and the accuracy and ceiling of the delay fallback.

Each part measures against a baseline taken in the same invocation:

  goodput   a kernel MPTCP transfer c1 -> s1 (conformance.endpoints.transfer) over `two_path` with
            bw=100 on every path link: two 100 Mbit/s paths, two subflows; also one path alone
            (one subflow), and the same two-subflow transfer unshaped (the baseline: what this
            machine and the transfer program manage without a limit). Goal: two paths >= 190 Mbit/s,
            95 % of the 200 Mbit/s sum. HTB counts whole frames (Ethernet, IP, TCP and MPTCP
            headers), so the table also shows the frames' rate against the limit and the goodput
            that limit allows with the headers these segments carried.
  delay     round trips from c1 to r1 (one link: a delay line each way) and to s1 (two links) with
            delay= 10, 50 and 100 ms on the path links, forced onto the netem-less fallback,
            against the same round trips unshaped. ICMP echo from a raw socket: the kernel answers,
            both times are taken here in user space, at real-time priority as the delay lines run
            (so that this process's own wake-ups on a loaded machine do not count as the lines'
            error). Error = measured RTT - (configured RTT + unshaped mean RTT), per probe. Goal:
            error <= 1 ms. r1's lines' own release error (release time - due time, as they measured
            it) is shown beside.
  ceiling   one subflow over path 1 with delay=10ms and bw= 100, 200 or no limit, against the same
            transfer with neither: how much a router's delay line carries, and how accurately.

A measurement, not a pass/fail: the exit status is 0, or 2 for bad arguments.

    sudo .venv/bin/python benchmarks/links.py [--seconds S] [--probes N] [--only goodput,delay,ceiling]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import socket
import statistics
import struct
import sys
import time
import traceback
from collections.abc import Iterator

from pyroute2 import IPRoute

from conformance.endpoints.linux import EndpointFlags, MptcpConfig, PMEndpoint, configure
from conformance.errors import HarnessError
from conformance.net.links import EMULATION_ENV
from conformance.net.names import release_run, run_tmpdir
from conformance.net.network import Network, network
from conformance.net.registry import make_topology
from conformance.proc import Background, in_netns

TRANSFER = [sys.executable, "-m", "conformance.endpoints.transfer"]
PATH_BW = 100  # Mbit/s per path
GOODPUT_GOAL = 190.0  # Mbit/s over two paths
DELAYS = (10, 50, 100)  # ms, per direction
DELAY_GOAL = 1.0  # ms of round-trip error
PARTS = ("goodput", "delay", "ceiling")


# --- transfers ---------------------------------------------------------------------------------

def _tx_bytes(net: Network, node: str, ifnames: list[str]) -> int:
    with in_netns(net.netns(node)):
        ipr = IPRoute()
    try:
        total = 0
        for ifname in ifnames:
            link = ipr.get_links(ifname=ifname)[0]
            total += link.get_attr("IFLA_STATS64")["tx_bytes"]
        return total
    finally:
        ipr.close()


def transfer(net: Network, size: int, subflows: int, tag: str) -> dict:
    """Client c1 sends `size` bytes to s1 over `subflows` subflows. Goodput counts from when the
    client had its subflows (it sends a first 1000 bytes, waits for the joins, then the bulk)."""
    folder = run_tmpdir() / f"links-{tag}"
    folder.mkdir(exist_ok=True)
    c1_addrs = net.topo.addresses("c1", 4)
    endpoints = [PMEndpoint(c1_addrs[1], EndpointFlags.SUBFLOW, dev="c1-eth1")] if subflows > 1 else []
    configure(net["c1"], MptcpConfig(subflows=subflows - 1, endpoints=endpoints))
    configure(net["s1"], MptcpConfig(subflows=subflows - 1))
    port = 5301
    common = ["--port", str(port), "--wait-subflows", str(subflows), "--timeout", "120"]
    server = Background([*TRANSFER, "server", "--addr", "0.0.0.0", "--send", "0", "--expect", str(size),
                         "--report", str(folder / "server.json"), *common], netns=net.netns("s1"),
                        stdout=folder / "server.out", stderr=folder / "server.err")
    client = None
    try:
        server.wait_for_output("listening", "transfer server")
        ifnames = [i for _, i in net.topo.interfaces("c1")]
        before = _tx_bytes(net, "c1", ifnames)
        client = Background([*TRANSFER, "client", "--addr", net.topo.addresses("s1", 4)[0], "--send", str(size),
                             "--expect", "0", "--report", str(folder / "client.json"), *common],
                            netns=net.netns("c1"), stdout=folder / "client.out", stderr=folder / "client.err")
        client.wait(300)
        server.wait(30)
        after = _tx_bytes(net, "c1", ifnames)
    finally:
        for proc in (client, server):
            if proc is not None:
                proc.stop()
    cli = json.loads((folder / "client.json").read_text())
    srv = json.loads((folder / "server.json").read_text())
    if not (cli.get("ok") and srv.get("ok")):
        raise HarnessError(f"transfer {tag} failed: client {cli.get('error')}, server {srv.get('error')}")
    seconds = srv["duration_s"] - cli.get("waited_for_subflows_s", 0.0)
    frames = after - before
    return {"mbps": size * 8 / seconds / 1e6, "seconds": seconds, "frames_mbps": frames * 8 / seconds / 1e6,
            "payload_share": size / max(frames, 1), "subflows": cli.get("subflows_before_bulk") or subflows}


# Two plain TCP flows, one per path: what the emulated links carry with no MPTCP scheduler involved.
SINK = """
import socket, sys, time
ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("0.0.0.0", int(sys.argv[1])))
ls.listen(8)
print("listening", flush=True)
conns = [ls.accept()[0] for _ in range(int(sys.argv[2]))]
buf, total, first, last = bytearray(1 << 20), 0, None, 0
for c in conns:
    c.setblocking(False)
import selectors
sel = selectors.DefaultSelector()
for c in conns:
    sel.register(c, selectors.EVENT_READ)
while sel.get_map():
    for key, _ in sel.select():
        try:
            n = key.fileobj.recv_into(buf)
        except BlockingIOError:
            continue
        if not n:
            sel.unregister(key.fileobj)
            continue
        first = first or time.monotonic()
        last = time.monotonic()
        total += n
print(total, last - first, flush=True)
"""
SOURCE = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.bind((sys.argv[1], 0))
s.connect((sys.argv[2], int(sys.argv[3])))
left, block = int(sys.argv[4]), memoryview(bytes(1 << 20))
while left > 0:
    left -= s.send(block[: min(len(block), left)])
s.close()
"""


def tcp_flows(net: Network, size: int) -> dict:
    """One plain TCP flow from each client address to s1, at once; goodput of the pair."""
    srcs = net.topo.addresses("c1", 4)
    folder = run_tmpdir() / "links-tcp"
    folder.mkdir(exist_ok=True)
    sink = Background([sys.executable, "-c", SINK, "5302", str(len(srcs))], netns=net.netns("s1"),
                      stdout=folder / "sink.out", stderr=folder / "sink.err")
    sources = []
    try:
        sink.wait_for_output("listening", "TCP sink")
        ifnames = [i for _, i in net.topo.interfaces("c1")]
        before = _tx_bytes(net, "c1", ifnames)
        sources = [Background([sys.executable, "-c", SOURCE, src, net.topo.addresses("s1", 4)[0], "5302",
                               str(size // len(srcs))], netns=net.netns("c1")) for src in srcs]
        for proc in sources:
            proc.wait(300)
        sink.wait(30)
        after = _tx_bytes(net, "c1", ifnames)
    finally:
        for proc in [*sources, sink]:
            proc.stop()
    total, seconds = sink.output().split()[-2:]
    frames = after - before
    return {"mbps": int(total) * 8 / float(seconds) / 1e6, "seconds": float(seconds),
            "frames_mbps": frames * 8 / float(seconds) / 1e6, "payload_share": int(total) / max(frames, 1),
            "subflows": len(srcs)}


def _size(seconds: float, mbps: float) -> int:
    return int(seconds * mbps * 1e6 / 8)


def part_goodput(seconds: float) -> list[str]:
    with network(make_topology("two_path")) as net:
        base = transfer(net, _size(max(seconds / 2, 1), 1500), 2, "unshaped")
    with network(make_topology("two_path", bw=PATH_BW)) as net:
        two = transfer(net, _size(seconds, 2 * PATH_BW), 2, "two-paths")
    with network(make_topology("two_path", bw=PATH_BW)) as net:
        one = transfer(net, _size(seconds, PATH_BW), 1, "one-path")
        tcp = tcp_flows(net, _size(seconds, 2 * PATH_BW))
    rows = [("unshaped (baseline)", base, None), (f"1 path, bw={PATH_BW}", one, PATH_BW),
            (f"2 paths, bw={PATH_BW} each", two, 2 * PATH_BW),
            ("2 TCP flows, 1 per path", tcp, 2 * PATH_BW)]
    out = ["goodput: c1 -> s1 over two_path, Mbit/s (kernel MPTCP with conformance.endpoints.transfer; the last",
           "row two plain TCP connections, one per path, for reference)", "",
           f"{'transfer':<24}{'flows':>6}{'goodput':>10}{'of limit':>10}{'of base':>9}"
           f"{'frames':>9}{'of limit':>10}{'allowed':>9}"]
    for label, r, limit in rows:
        share = f"{r['mbps'] / limit:.1%}" if limit else "-"
        frames = f"{r['frames_mbps'] / limit:.1%}" if limit else "-"
        allowed = f"{limit * r['payload_share']:.1f}" if limit else "-"
        out.append(f"{label:<24}{r['subflows']:>6}{r['mbps']:>10.1f}{share:>10}{r['mbps'] / base['mbps']:>9.3f}"
                   f"{r['frames_mbps']:>9.1f}{frames:>10}{allowed:>9}")
    verdict = "met" if two["mbps"] >= GOODPUT_GOAL else "not met"
    out += ["", f"goal: 2 paths >= {GOODPUT_GOAL:g} Mbit/s (95 % of {2 * PATH_BW}): {verdict} "
            f"({two['mbps']:.1f} Mbit/s = {two['mbps'] / (2 * PATH_BW):.1%} of the sum)",
            "frames: what left c1's interfaces, headers included (what HTB limits); allowed: the goodput the",
            "limit leaves with the header bytes these segments carried (payload share of the frames)"]
    return out


# --- round trips -------------------------------------------------------------------------------

def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


@contextlib.contextmanager
def _realtime() -> Iterator[None]:
    """The probe at real-time priority (as the delay lines are): on a loaded machine, a normal
    process would add its own wake-up delays to the round trips it measures."""
    before = os.sched_getscheduler(0), os.sched_getparam(0)
    with contextlib.suppress(OSError):
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    try:
        yield
    finally:
        os.sched_setscheduler(0, before[0], before[1])


def icmp_rtts(netns: str, dst: str, count: int, interval: float, wait: float) -> list[float]:
    """RTTs in ms of `count` ICMP echoes sent every `interval` s; the kernel at `dst` answers."""
    with _realtime():
        return _icmp_rtts(netns, dst, count, interval, wait)


def _icmp_rtts(netns: str, dst: str, count: int, interval: float, wait: float) -> list[float]:
    with in_netns(netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    sent: dict[int, int] = {}
    rtts: list[float] = []
    try:
        sock.setblocking(False)
        next_send = time.perf_counter()
        end = None
        seq = 0
        while True:
            now = time.perf_counter()
            if seq < count and now >= next_send:
                body = struct.pack("!HH", ident, seq) + b"mptcp-conformance".ljust(32, b".")
                head = struct.pack("!BBH", 8, 0, 0)
                packet = struct.pack("!BBH", 8, 0, _checksum(head + body)) + body
                sent[seq] = time.perf_counter_ns()
                sock.sendto(packet, (dst, 0))
                seq += 1
                next_send += interval
                if seq == count:
                    end = time.perf_counter() + wait
            if end is not None and (time.perf_counter() > end or len(rtts) == count):
                return rtts
            timeout = max(0.0, min(next_send if seq < count else end, end or next_send) - time.perf_counter())
            if select.select([sock], [], [], timeout)[0]:
                while True:
                    try:
                        data = sock.recv(2048)
                    except BlockingIOError:
                        break
                    got = time.perf_counter_ns()
                    ihl = (data[0] & 0x0F) * 4
                    kind, _, _, rid, rseq = struct.unpack_from("!BBHHH", data, ihl)
                    if kind == 0 and rid == ident and rseq in sent:
                        rtts.append((got - sent.pop(rseq)) / 1e6)
    finally:
        sock.close()


def _dist(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    return {"mean": statistics.fmean(v), "p50": v[len(v) // 2], "p99": v[min(len(v) - 1, int(0.99 * len(v)))],
            "max": v[-1]}


TARGETS = (("r1", "198.18.1.1", 1), ("s1", "198.19.0.2", 2))  # (name, address, delayed links crossed)


def part_delay(probes: int) -> list[str]:
    interval = 0.01
    base: dict[str, list[float]] = {}
    with network(make_topology("two_path")) as net:
        for name, addr, _ in TARGETS:
            icmp_rtts(net.netns("c1"), addr, 20, interval, 1)  # warm-up: neighbours, caches
            base[name] = icmp_rtts(net.netns("c1"), addr, probes, interval, 1)
    out = ["delay fallback: round trips from c1, ms (each link crossed twice, one delay line each way)", ""]
    for name, _, _links in TARGETS:
        b = _dist(base[name])
        out.append(f"unshaped baseline c1 -> {name}: mean {b['mean']:.3f}, p50 {b['p50']:.3f}, p99 {b['p99']:.3f},"
                   f" max {b['max']:.3f} ({len(base[name])} probes)")
    out += ["", f"{'delay':>6}{'to':>4}{'RTT set':>9}{'RTT mean':>10}{'ratio':>8}{'err mean':>10}{'err p50':>9}"
            f"{'err p99':>9}{'err max':>9}{'lost':>6}   r1's lines, release error mean / p99 (in, out)"]
    worst = 0.0
    for delay in DELAYS:
        with network(make_topology("two_path", delay=f"{delay}ms")) as net:
            rtts = {name: icmp_rtts(net.netns("c1"), addr, probes, interval, 2 * links * delay / 1000 + 1)
                    for name, addr, links in TARGETS}
            lines = {line["hook"]: line for line in net.delay_stats()["r1"]["lines"]
                     if line["queue"] in (19792, 19793)}  # r1-eth0: in from c1, out to c1
        rel = ", ".join(f"{lines[h]['release_error_ms']['mean']:+.3f} / {lines[h]['release_error_ms']['p99']:+.3f}"
                        for h in ("in", "out") if h in lines)
        for name, _, links in TARGETS:
            want, base_mean = 2 * links * delay, statistics.fmean(base[name])
            err = _dist([r - want - base_mean for r in rtts[name]])
            worst = max(worst, abs(err["mean"]))
            mean = statistics.fmean(rtts[name])
            out.append(f"{delay:>6}{name:>4}{want:>9}{mean:>10.3f}{mean / (want + base_mean):>8.4f}"
                       f"{err['mean']:>+10.3f}{err['p50']:>+9.3f}{err['p99']:>+9.3f}{err['max']:>+9.3f}"
                       f"{probes - len(rtts[name]):>6}   {rel if name == 'r1' else ''}")
    out += ["", f"goal: |mean error| <= {DELAY_GOAL:g} ms: {'met' if worst <= DELAY_GOAL else 'not met'} "
            f"(worst {worst:.3f} ms); the p99 includes this machine's own scheduling noise (baseline p99 above)",
            "error: measured RTT - (configured RTT + unshaped mean RTT), per probe"]
    return out


CEILING_RATES = (100, 200, None)  # Mbit/s on the path links, None: no limit


def part_ceiling(seconds: float) -> list[str]:
    with network(make_topology("two_path")) as net:
        base = transfer(net, _size(seconds / 2, 1000), 1, "ceiling-base")
    out = ["delay line load: one subflow c1 -> s1 over path 1 with delay=10ms on its two links (40 ms RTT),",
           "Mbit/s; r1's lines carry the data twice (in from c1, out to rs) and the ACKs once", "",
           f"{'transfer':<28}{'goodput':>9}{'of base':>9}{'of limit':>10}   r1's data lines: release error"
           " mean / p99 ms; dropped (queue full)",
           f"{'no delay, no limit (base)':<28}{base['mbps']:>9.1f}{1:>9.3f}{'-':>10}"]
    for rate in CEILING_RATES:
        params = {"delay": "10ms", **({"bw": rate} if rate else {})}
        with network(make_topology("two_path", **params)) as net:
            size = _size(seconds, rate * 0.9 if rate else max(base["mbps"] * 0.4, 100))
            r = transfer(net, size, 1, f"ceiling-{rate}")
            lines = net.delay_stats()["r1"]["lines"]
        data = [line for line in lines if (line["hook"], line["queue"]) in (("in", 19792), ("out", 19795))]
        errs = ", ".join(f"{line['release_error_ms']['mean']:+.3f} / {line['release_error_ms']['p99']:+.3f}"
                         for line in data)
        dropped = sum(line["queue_dropped"] + line["user_dropped"] for line in lines)
        label = f"delay=10ms, bw={rate}" if rate else "delay=10ms, no limit"
        limit = f"{r['mbps'] / rate:.1%}" if rate else "-"
        out.append(f"{label:<28}{r['mbps']:>9.1f}{r['mbps'] / base['mbps']:>9.3f}{limit:>10}   {errs}; {dropped}")
    out += ["", "no limit: the delay line itself is the bottleneck (one single-threaded helper per router); its",
            "release error then grows with its backlog, and packets beyond the 1000-packet limit are dropped"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each shaped transfer (default 4)")
    parser.add_argument("--probes", type=int, default=200, help="ICMP probes per delay (default 200)")
    parser.add_argument("--only", default=",".join(PARTS), help=f"parts to run, of {','.join(PARTS)}")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    if not parts or any(p not in PARTS for p in parts):
        parser.error(f"--only: expected parts among {', '.join(PARTS)}, got {args.only!r}")
    if not 0.5 <= args.seconds <= 60:
        parser.error("--seconds must be between 0.5 and 60")
    if not 10 <= args.probes <= 10_000:
        parser.error("--probes must be between 10 and 10000")
    if os.geteuid() != 0:
        print("benchmarks/links.py: needs root (network namespaces, tc, iptables); nothing measured")
        return 0
    os.environ[EMULATION_ENV] = "fallback"  # the delay fallback is what is measured, netem or not
    blocks = []
    try:
        for part in parts:
            try:
                if part == "goodput":
                    blocks.append(part_goodput(args.seconds))
                elif part == "delay":
                    blocks.append(part_delay(args.probes))
                else:
                    blocks.append(part_ceiling(args.seconds))
            except Exception:  # a part that cannot run says why; the others still run
                print(f"part {part} could not complete:\n" + traceback.format_exc(), file=sys.stderr)
    finally:
        with contextlib.suppress(Exception):
            release_run()
    print("\n\n".join("\n".join(b) for b in blocks))
    print("\n(a measurement, not a pass/fail: exit status is always 0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
