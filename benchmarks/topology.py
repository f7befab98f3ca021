"""Bring-up and tear-down time of `two_path` (ipv4): our code against a plain shell baseline.

Both sides build the same network in the same invocation, cycle after cycle (interleaved, after
one untimed warm-up each):

  ours      `network(make_topology("two_path"))`: up = entering the block (topology object
            included), down = leaving it.
  baseline  a bash script with one `ip`/`ethtool`/`sysctl` command per step: `ip netns add`,
            `ip link add ... type veth peer ... netns`, addresses, the same sysctls (rp_filter,
            DAD, forwarding on routers), `ethtool -K ... tso off gso off gro off` on every
            interface, routes, the client's (and server's) per-interface tables and policy rules;
            down = `ip netns del` of every namespace. The commands are generated from the same
            topology plan, so both sides configure identical networks (checked with a TCP connect
            from every client address before timing).

The goal is ours/baseline <= 1.5x; this is a measurement, it always exits 0.

    sudo .venv/bin/python benchmarks/topology.py [--repeat N] [--show-script]
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import shlex
import socket
import statistics
import subprocess
import sys
import time
import traceback

from conformance.net.names import PREFIX_STEM, release_run, remove_netns, run_prefix
from conformance.net.network import network
from conformance.net.registry import make_topology
from conformance.net.topo import MptcpTopo
from conformance.proc import in_netns

GOAL = 1.5
TOPOLOGY = "two_path"
SYSCTLS = {  # what conformance.net.nodes writes in every namespace
    "net.ipv4.conf.all.rp_filter": "0",
    "net.ipv4.conf.default.rp_filter": "0",
    "net.ipv6.conf.all.accept_dad": "0",
    "net.ipv6.conf.default.accept_dad": "0",
    "net.ipv6.conf.default.accept_ra": "0",
}
ROUTER_SYSCTLS = {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"}


# --- the baseline ------------------------------------------------------------------------------

def baseline_scripts(topo: MptcpTopo, prefix: str) -> tuple[str, str, dict[str, str]]:
    """(bring-up script, tear-down script, node -> namespace) for `topo`, in plain shell."""
    ns = {node: f"{prefix}{node}" for node in topo.nodes()}
    q = shlex.quote
    up = ["set -e"]
    for node in topo.nodes():
        sysctls = {**SYSCTLS, **(ROUTER_SYSCTLS if topo.nodeInfo(node)["role"] == "router" else {})}
        up.append(f"ip netns add {q(ns[node])}")
        up.append(f"ip -n {q(ns[node])} link set lo up")
        up.append(f"ip netns exec {q(ns[node])} sysctl -q -w "
                  + " ".join(f"{k}={v}" for k, v in sysctls.items()))
    for _, _, info in topo.links(withInfo=True):
        ends = [(info[f"node{i}"], f"{info[f'node{i}']}-eth{info[f'port{i}']}",
                 info.get(f"params{i}", {}).get("addrs", [])) for i in (1, 2)]
        (a, a_if, _), (b, b_if, _) = ends
        up.append(f"ip -n {q(ns[a])} link add {a_if} type veth peer name {b_if} netns {q(ns[b])}")
        for node, intf, addrs in ends:
            for addr in addrs:
                nodad = " nodad" if ipaddress.ip_interface(addr).version == 6 else ""
                up.append(f"ip -n {q(ns[node])} addr add {addr} dev {intf}{nodad}")
            up.append(f"ip netns exec {q(ns[node])} ethtool -K {intf} tso off gso off gro off")
            up.append(f"ip -n {q(ns[node])} link set {intf} up")
    for node in topo.nodes():
        info = topo.nodeInfo(node)
        for rule in info["rules"]:
            net = ipaddress.ip_network(rule["src"], strict=False)
            up.append(f"ip -n {q(ns[node])} -{net.version} rule add from {rule['src']} "
                      f"table {rule['table']} priority {rule['priority']}")
        for route in info["routes"]:
            dst = ipaddress.ip_network(route["dst"])
            cmd = f"ip -n {q(ns[node])} -{dst.version} route add {'default' if not dst.prefixlen else dst}"
            cmd += f" via {route['via']}" if route.get("via") else " scope link"
            cmd += f" dev {route['dev']}"
            if route.get("src"):
                cmd += f" src {route['src']}"
            if route.get("table"):
                cmd += f" table {route['table']}"
            up.append(cmd)
    down = [f"ip netns del {q(name)}" for name in ns.values()]
    return "\n".join(up) + "\n", "\n".join(down) + "\n", ns


def _bash(script: str) -> None:
    cp = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    if cp.returncode != 0:
        raise RuntimeError(f"baseline script failed (exit {cp.returncode}): {cp.stderr.strip()[-500:]}")


def _baseline_leftovers(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


def _remove_baseline(prefix: str) -> None:
    for name in _baseline_leftovers(prefix):
        remove_netns(name)


# --- both sides --------------------------------------------------------------------------------

def _check_reachable(topo: MptcpTopo, ns: dict[str, str]) -> None:
    """A TCP connect from every client address to the server (so both sides build a working net)."""
    dst = topo.addresses(topo.server, 4)[0]
    with in_netns(ns[topo.server]):
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with ls:
        ls.bind((dst, 0))
        ls.listen(8)
        for src in topo.addresses(topo.client, 4):
            with in_netns(ns[topo.client]):
                c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            with c:
                c.settimeout(5)
                c.bind((src, 0))
                c.connect((dst, ls.getsockname()[1]))


def ours_cycle(check: bool = False) -> tuple[float, float]:
    t0 = time.perf_counter()
    topo = make_topology(TOPOLOGY, family="ipv4")
    cm = network(topo)
    net = cm.__enter__()
    t1 = time.perf_counter()
    try:
        if check:
            _check_reachable(topo, {n: net.netns(n) for n in topo.nodes()})
    except BaseException:
        cm.__exit__(*sys.exc_info())
        raise
    t2 = time.perf_counter()
    cm.__exit__(None, None, None)
    t3 = time.perf_counter()
    return t1 - t0, t3 - t2


def baseline_cycle(topo: MptcpTopo, up: str, down: str, ns: dict[str, str], prefix: str,
                   check: bool = False) -> tuple[float, float]:
    try:
        t0 = time.perf_counter()
        _bash(up)
        t1 = time.perf_counter()
        if check:
            _check_reachable(topo, ns)
        t2 = time.perf_counter()
        _bash(down)
        t3 = time.perf_counter()
    finally:
        _remove_baseline(prefix)  # only after a failure is there anything left
    return t1 - t0, t3 - t2


# --- report ------------------------------------------------------------------------------------

def _ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f}"


def render(ours: list[tuple[float, float]], base: list[tuple[float, float]], repeat: int) -> str:
    rows = []
    for label, pick in (("bring-up", lambda c: c[0]), ("tear-down", lambda c: c[1]),
                        ("total", lambda c: c[0] + c[1])):
        o, b = [pick(c) for c in ours], [pick(c) for c in base]
        om, omed, bm, bmed = statistics.mean(o), statistics.median(o), statistics.mean(b), statistics.median(b)
        ratio = om / bm if bm else float("inf")
        rows.append((label, om, omed, bm, bmed, ratio, omed / bmed if bmed else float("inf")))
    head = (f"{TOPOLOGY} (ipv4): {repeat} bring-up + tear-down cycles each, interleaved, after one "
            f"untimed warm-up; times in ms")
    cols = ("phase", "ours mean", "ours median", "base mean", "base median", "ratio mean",
            "ratio median", f"goal <= {GOAL}x")
    widths = [10, 10, 12, 10, 12, 11, 13, 14]
    line = "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cols, widths, strict=True)))
    out = [head, "", line, "-" * len(line)]
    for label, om, omed, bm, bmed, ratio, ratio_med in rows:
        verdict = "within" if ratio <= GOAL else "over"
        cells = (label, _ms(om), _ms(omed), _ms(bm), _ms(bmed), f"{ratio:.2f}x", f"{ratio_med:.2f}x", verdict)
        out.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths,
                                                                                           strict=True))))
    out += ["", "(goal judged on the mean ratio; a measurement, not a pass/fail: exit status is always 0)"]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed cycles per side (default 5)")
    parser.add_argument("--show-script", action="store_true", help="print the baseline scripts and exit")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    if os.geteuid() != 0 and not args.show_script:
        print("benchmarks/topology.py: needs root (network namespaces, veth); nothing measured")
        return 0
    topo = make_topology(TOPOLOGY, family="ipv4")
    if args.show_script:  # no run of ours: no owner record, just the names a run would use
        up, down, _ = baseline_scripts(topo, f"{PREFIX_STEM}{os.getpid()}-bl-")
        print("# bring-up\n" + up + "\n# tear-down\n" + down)
        return 0
    prefix = f"{run_prefix()}-bl-"
    up, down, ns = baseline_scripts(topo, prefix)
    ours: list[tuple[float, float]] = []
    base: list[tuple[float, float]] = []
    try:
        # Warm-up (caches, first imports, kernel module state) and an equivalence check.
        ours_cycle(check=True)
        baseline_cycle(topo, up, down, ns, prefix, check=True)
        for _ in range(args.repeat):
            ours.append(ours_cycle())
            base.append(baseline_cycle(topo, up, down, ns, prefix))
    except Exception:  # a measurement that cannot run says why and still exits 0
        print("benchmark could not complete:\n" + traceback.format_exc(), file=sys.stderr)
    finally:
        _remove_baseline(prefix)
        with contextlib.suppress(Exception):
            release_run()
    if ours and base:
        print(render(ours, base, len(ours)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
