"""Link emulation without netem (conformance.net.emulation, conformance.net.delayline) and link
events on a running network: the pure parts (no root), then what really happens (root).

The live tests force the fallback (MPTCP_CONFORMANCE_LINK_EMULATION=fallback) so they test the
same code on a kernel that has netem. Their bounds are loose on purpose: they show that the loss
and the delay are applied, not how precisely (benchmarks/links.py measures that), on a shared
two-core machine where scheduling alone moves a round trip by a millisecond or more."""

from __future__ import annotations

import json
import math
import os
import random
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conformance.errors import TopologyError
from conformance.net import delayline
from conformance.net.cleanup import Cleanup
from conformance.net.emulation import Impairment, chains
from conformance.net.links import EMULATION_ENV
from conformance.net.names import STATE_DIR, remove_netns, run_prefix, sweep_stale
from conformance.net.network import Network, network
from conformance.net.registry import make_topology
from conformance.net.shaping import LinkShape
from conformance.proc import in_netns, run

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, iptables, NFQUEUE)")
REPO = Path(__file__).resolve().parents[1]
PATH_LINK_ENDS = {"c1-eth0", "c1-eth1", "r1-eth0", "r1-eth1", "r2-eth0", "r2-eth1", "rs-eth0", "rs-eth1"}


# --- validation (no root) ----------------------------------------------------------------------

@pytest.mark.parametrize(("params", "match"), [
    ({"delay": -1}, r"^delay=-1: a time cannot be negative$"),
    ({"delay": "fast"}, r"^delay='fast': expected a time such as '10ms'"),
    ({"delay": math.nan}, r"^delay=nan: expected a finite time"),
    ({"delay": math.inf}, r"^delay=inf: expected a finite time"),
    ({"delay": True}, r"^delay=True: expected a time"),
    ({"delay": "10ms", "jitter": "-1ms"}, r"^jitter='-1ms': expected a time"),
    ({"delay": "10ms", "jitter": math.nan}, r"^jitter=nan: expected a finite time"),
    ({"jitter": "2ms"}, r"^jitter='2ms' needs a delay= to vary around$"),
    ({"loss": 101}, r"^loss=101: expected a percentage between 0 and 100$"),
    ({"loss": -0.5}, r"^loss=-0.5: expected a percentage"),
    ({"loss": "5%"}, r"^loss='5%': expected a percentage"),
    ({"loss": math.nan}, r"^loss=nan: expected a percentage"),
    ({"loss": True}, r"^loss=True: expected a percentage"),
    ({"bw": math.nan}, r"^bw=nan: expected a positive number"),
    ({"bw": math.inf}, r"^bw=inf: expected a positive number"),
])
def test_bad_link_parameters_are_one_line_errors_naming_the_parameter(params, match):
    with pytest.raises(TopologyError, match=match) as exc:
        LinkShape.from_params(**params)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("name", ["two_path", "two_path_server", "n_path"])
@pytest.mark.parametrize(("params", "word"), [
    ({"delay": "soon"}, "delay="), ({"jitter": "1ms"}, "jitter="), ({"loss": 150}, "loss="),
    ({"dealy": "10ms"}, "dealy"),
])
def test_topologies_reject_bad_link_parameters_without_root(name, params, word):
    with pytest.raises(TopologyError, match=re.escape(word)) as exc:
        make_topology(name, **params)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize(("name", "params", "links"), [
    ("two_path", {}, 4), ("two_path_server", {}, 4), ("n_path", {"n": 3, "multihomed": "both"}, 6)])
def test_topologies_carry_delay_jitter_loss_on_their_path_links(name, params, links):
    topo = make_topology(name, delay="10ms", jitter=2, loss=0.5, **params)
    shaped = [info for _, _, info in topo.links(withInfo=True)
              if (info.get("delay"), info.get("jitter"), info.get("loss")) == ("10ms", 2, 0.5)]
    assert len(shaped) == links
    shape = LinkShape.from_params(delay="10ms", jitter=2, loss=0.5)
    assert (shape.delay_ms, shape.jitter_ms, shape.loss, shape.needs_netem) == (10.0, 2.0, 0.5, True)


# --- the delay line's parts (no root) ----------------------------------------------------------

def test_line_keeps_order_under_jitter_and_releases_in_batches():
    random.seed(8684)
    line = delayline.Line(7, delay_ms=10, jitter_ms=8, limit=100)
    for i in range(200):
        line.arrive(i, arrived=i * 1_000_000)  # one packet a millisecond
    dues = [due for due, _ in line.waiting]
    assert dues == sorted(dues), "a delay line never lets a packet overtake another"
    assert all(d >= a * 1_000_000 + 2_000_000 for a, d in zip(range(200), dues, strict=True))  # >= delay - jitter
    assert len(set(dues)) > 50, "jitter spreads the release times"
    first = line.release(upto=dues[50], now=dues[50])
    assert first == max(i for i, (due, _) in enumerate(zip(dues, range(200), strict=True)) if due <= dues[50])
    assert line.next_due() > dues[50]
    stats = line.stats()
    assert stats["packets"] == 200 and stats["waiting"] == 200 - first - 1 and stats["hook"] == "in"
    # Released at dues[50]: each packet's error is how long after its own due time that was.
    assert stats["release_error_ms"]["p1"] >= 0
    assert stats["release_error_ms"]["p99"] * 1e6 <= dues[50] - dues[0] + 1


def test_waker_learns_the_wake_up_latency():
    waker = delayline.Waker()
    for _ in range(200):
        waker.woke(asked=1_000_000, now=1_150_000)  # always 150 us late
    assert 140_000 <= waker.advance <= 150_000
    waker.woke(asked=0, now=10**12)  # one absurd wake-up cannot push it beyond the cap
    assert waker.advance <= delayline.Waker.CAP_NS


def _nla(kind: int, payload: bytes) -> bytes:
    return delayline._attr(kind, payload)


def test_packet_messages_are_parsed_with_stamp_and_input_interface():
    # In the kernel's order (nfqnl_build_packet_message): header, devices, mark, hwaddr, stamp, ...
    attrs = (_nla(delayline.NFQA_PACKET_HDR, struct.pack(">IHB", 4242, 0x0800, 0))
             + _nla(delayline.NFQA_IFINDEX_INDEV, struct.pack(">I", 3))
             + _nla(9, struct.pack(">H2x8s", 6, b"\x02" * 8))  # NFQA_HWADDR
             + _nla(delayline.NFQA_TIMESTAMP, struct.pack(">QQ", 1700000000, 250))
             + _nla(14, struct.pack(">I", 0)))  # NFQA_SKB_INFO
    msg = delayline._message(delayline.NFQNL_MSG_PACKET, 19793, attrs, 0, 0)
    error = struct.pack("=IHHII", 36, delayline.NLMSG_ERROR, 0, 9, 0) + struct.pack("=i", -1) + b"\0" * 16
    nfq = delayline.NfQueue.__new__(delayline.NfQueue)  # the parser alone: no socket
    nfq.errors = []
    out: list = []
    assert nfq._parse(msg + msg + error, out, seq=9) == 1  # EPERM answers request 9
    assert out == [(19793, 4242, 1700000000 * 10**9 + 250_000, 3)] * 2
    assert nfq._parse(error, out) is None and nfq.errors == [1]  # unasked: kept
    local = delayline._message(delayline.NFQNL_MSG_PACKET, 19793, attrs[:12] + _nla(14, b"\0" * 4), 0, 0)
    out.clear()
    nfq._parse(local, out)
    assert out == [(19793, 4242, 0, 0)]  # a locally sent packet: no stamp, no input interface


def test_verdict_and_config_messages_are_well_formed():
    msg = delayline._message(delayline.NFQNL_MSG_VERDICT_BATCH, 0x4D51, _nla(
        delayline.NFQA_VERDICT_HDR, struct.pack(">II", delayline.NF_ACCEPT, 77)), delayline.NLM_F_REQUEST, 0)
    length, kind, flags, _, _ = struct.unpack_from("=IHHII", msg)
    assert (length, kind, flags) == (len(msg), 0x0303, 1)
    assert struct.unpack_from(">H", msg, 18)[0] == 0x4D51  # res_id: the queue, big-endian
    assert struct.unpack_from(">II", msg, 24) == (1, 77)
    assert len(msg) % 4 == 0


def test_control_commands_answer_errors_in_one_line():
    lines: dict = {}
    waker = delayline.Waker()
    nfq = delayline.NfQueue.__new__(delayline.NfQueue)  # nothing is bound: no socket needed
    nfq.errors = []
    bad = delayline._command(nfq, lines, waker, None, ["add", "x", "1", "0", "9", "in", "lo"])
    assert bad.startswith("error x bad numbers")
    assert delayline._command(nfq, lines, waker, None, ["add", "1", "2"]).startswith("error - unknown command")
    assert delayline._command(nfq, lines, waker, None, ["frobnicate"]).startswith("error - unknown command")
    assert delayline._command(nfq, lines, waker, None, []) == "error - empty command"
    assert json.loads(delayline._command(nfq, lines, waker, None, ["stats"])[6:])["lines"] == []


def test_rules_in_and_out():
    ingress = Impairment("ns", "r1-eth0", "in", "mpc1-r1-eth0", 2.5, 19792)
    assert ingress.table == "raw"
    assert ingress._rules() == ["-A mpc1-r1-eth0 -m statistic --mode random --probability 0.02500000 -j DROP",
                                "-A mpc1-r1-eth0 -j NFQUEUE --queue-num 19792"]
    assert [h.split(" -m ")[0] for h in ingress._hooks("-A")] == ["-A PREROUTING -i r1-eth0"]
    egress = Impairment("ns", "r1-eth1", "out", "mpc1-r1-eth1", None, 19795)
    assert egress.table == "security"  # after filter and mangle: a middlebox acts before the delay
    assert egress._rules() == ["-A mpc1-r1-eth1 -j NFQUEUE --queue-num 19795"]
    assert [h.split(" -m ")[0] for h in egress._hooks("-D")] == ["-D FORWARD -o r1-eth1", "-D OUTPUT -o r1-eth1"]


# --- live (root) -------------------------------------------------------------------------------

@pytest.fixture
def fallback(monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, iptables, NFQUEUE)")
    monkeypatch.setenv(EMULATION_ENV, "fallback")


def _our_netns() -> list[str]:
    return sorted(n for n in os.listdir("/run/netns") if n.startswith(run_prefix() + "-"))


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _ping(ns: str, dst: str, count: int, interval: float = 0.02, timeout: float = 60) -> dict:
    out = run(["ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", "2", dst], netns=ns,
              check=False, timeout=timeout).stdout
    sent, got = map(int, re.search(r"(\d+) packets transmitted, (\d+) received", out).groups())
    rtt = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms", out)
    stats = dict(zip(("min", "avg", "max", "mdev"), map(float, rtt.groups()), strict=True)) if rtt else {}
    return {"sent": sent, "received": got, **stats}


def _probabilities(rules: list[str]) -> list[float]:
    return [float(m.group(1)) for r in rules if (m := re.search(r"--probability ([\d.]+)", r))]


def _rule_packets(ns: str, table: str, chain: str) -> list[int]:
    """Packet counters of `chain`'s rules, in order."""
    out = run(["iptables", "-t", table, "-L", chain, "-v", "-n", "-x"], netns=ns).stdout
    return [int(line.split()[0]) for line in out.splitlines()[2:] if line.strip()]


@pytest.mark.usefixtures("fallback")
def test_rules_and_helpers_are_installed_and_removed_by_the_cleanup_stack():
    topo = make_topology("two_path", family="dual", delay="5ms", loss=1, max_queue_size=300)
    cleanup = Cleanup()
    try:
        net = Network(topo, cleanup)
        steps = [what for what, *_ in cleanup._stack]
        assert steps[0] == "stop topology"
        assert sum("delay line" in s for s in steps) == 3  # r1, r2, rs: never in an endpoint host
        assert sum("link emulation" in s for s in steps) == 8  # both directions of the 4 path links
        prefix = run_prefix()
        # Directions from c1 are held where they arrive (r1, r2: raw); the others where they leave
        # a router (security).
        tables = {"r1": ({"raw", "security"}, 3), "r2": ({"raw", "security"}, 3), "rs": ({"security"}, 2)}
        for node, (want, directions) in tables.items():
            for version in (4, 6):
                rules = chains(net.netns(node), version)
                assert {r.split(":")[0] for r in rules} == want, (node, rules)
                assert all(f"{prefix}-{node}-eth" in r for r in rules if " -N " in r or " -A mpc" in r), rules
                assert [round(p, 6) for p in _probabilities(rules)] == [0.01] * directions, rules
                assert sum("NFQUEUE" in r for r in rules) == directions, rules
        for node in ("c1", "s1"):  # endpoint hosts hold nothing: no rule, no helper
            assert chains(net.netns(node)) == [] and chains(net.netns(node), 6) == []
        lines = net.delay_stats()
        assert sorted(lines) == ["r1", "r2", "rs"]
        helpers = {n: net[n]._mpc_delay_line for n in lines}
        for node, helper in helpers.items():
            comm = Path(f"/proc/{helper.pid}/comm").read_text().strip()
            assert comm == f"{prefix}-dl-{node}"[:15]
            assert os.stat(f"/proc/{helper.pid}/ns/net").st_ino == os.stat(f"/run/netns/{net.netns(node)}").st_ino
            assert {line["limit"] for line in lines[node]["lines"]} == {300}
        # r1: in from c1 (c1 is a host), out to c1 and out to rs (r1 is a router).
        assert sorted((line["hook"], line["queue"]) for line in lines["r1"]["lines"]) == [
            ("in", 19792), ("out", 19793), ("out", 19795)]
    except BaseException:
        cleanup.run()
        raise
    cleanup.run()
    for helper in helpers.values():
        assert helper.proc.returncode == 0, "stopped by the stack (stdin closed), not killed with the netns"
        assert not _alive(helper.pid)
    assert _our_netns() == []


@pytest.mark.usefixtures("fallback")
def test_loss_only_needs_no_helper_and_bw_stays_a_qdisc():
    with network(make_topology("two_path", loss=5, bw=50)) as net:
        assert net.delay_stats() == {}
        assert [round(p, 6) for p in _probabilities(chains(net.netns("r1")))] == [0.05] * 3
        kinds = {q["kind"] for q in json.loads(run(["tc", "-j", "qdisc", "show", "dev", "r1-eth0"],
                                                   netns=net.netns("r1")).stdout)}
        assert "htb" in kinds and "netem" not in kinds
    assert _our_netns() == []


@pytest.mark.usefixtures("fallback")
def test_delay_adds_the_configured_round_trip():
    """c1 -> r1 crosses one link each way (2 x 20 ms), c1 -> s1 two (4 x 20 ms). Upper bounds
    leave 15 ms for a loaded machine; the minimum may be a fraction of a millisecond early (the
    line wakes up early by its learnt wake-up latency)."""
    with network(make_topology("two_path", delay="20ms")) as net:
        c1 = net.netns("c1")
        one = _ping(c1, "198.18.1.1", 20)
        two = _ping(c1, "198.19.0.2", 20)
        stats = net.delay_stats()
    assert one["received"] == 20 and two["received"] == 20
    assert one["min"] >= 39 and one["avg"] <= 40 + 15, one
    assert two["min"] >= 79 and two["avg"] <= 80 + 15, two
    r1 = stats["r1"]["lines"]
    assert all(line["kernel_stamped"] > 0 for line in r1 if line["hook"] == "in")
    assert all(line["queue_dropped"] == 0 and line["user_dropped"] == 0 for line in r1)


@pytest.mark.usefixtures("fallback")
def test_jitter_spreads_round_trips_around_the_delay():
    with network(make_topology("two_path", delay="20ms", jitter="8ms")) as net:
        r = _ping(net.netns("c1"), "198.18.1.1", 40)
    assert r["received"] == 40
    # Two lines, each 20 +- 8 ms (uniform), in order: 24..56 ms, spread visibly.
    assert r["min"] >= 23 and r["max"] <= 56 + 15 and r["mdev"] >= 1.5, r


def _entered(ns: str, table: str, chain: str) -> int:
    """Packets that jumped to `chain` (counters of the jumps in `table`'s built-in chains)."""
    out = run(["iptables", "-t", table, "-L", "-v", "-n", "-x"], netns=ns).stdout
    return sum(int(f[0]) for f in (line.split() for line in out.splitlines()) if len(f) > 2 and f[2] == chain)


@pytest.mark.usefixtures("fallback")
def test_loss_drops_roughly_the_configured_share():
    """20 % on each direction of c1-r1: a ping survives with 0.8 x 0.8 = 64 %. With 400 pings the
    standard deviation is 2.4 points for the ping loss and 2 points for each direction's drop
    share (DROP rule counter over packets entering the chain): the bounds are four of them wide."""
    with network(make_topology("two_path", loss=20)) as net:
        r = _ping(net.netns("c1"), "198.18.1.1", 400, interval=0.002)
        r1, chain = net.netns("r1"), f"{run_prefix()}-r1-eth0"
        shares = [(_rule_packets(r1, table, chain)[0], _entered(r1, table, chain))
                  for table in ("raw", "security")]
    lost = 1 - r["received"] / r["sent"]
    assert 0.26 <= lost <= 0.46, r
    for dropped, seen in shares:  # in: c1 -> r1 (raw), out: r1 -> c1 (security)
        assert seen >= 300 and 0.12 <= dropped / seen <= 0.28, shares


def _connect(ns: str, src: str, dst: str, port: int, timeout: float = 1.0) -> bool:
    af = socket.AF_INET6 if ":" in dst else socket.AF_INET
    with in_netns(ns):
        s = socket.socket(af, socket.SOCK_STREAM)
    with s:
        s.settimeout(timeout)
        s.bind((src, 0))
        try:
            s.connect((dst, port))
            return True
        except OSError:
            return False


class _Listener:
    def __init__(self, ns: str, addr: str):
        with in_netns(ns):
            self.sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((addr, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


def _tx_bytes(ns: str, ifname: str) -> int:
    link = json.loads(run(["ip", "-s", "-j", "link", "show", ifname], netns=ns).stdout)[0]
    return link["stats64"]["tx"]["bytes"]


def _link(ns: str, ifname: str) -> tuple[str, set[str]]:
    link = json.loads(run(["ip", "-j", "link", "show", ifname], netns=ns).stdout)[0]
    return link["operstate"], set(link["flags"])


@needs_root
def test_link_down_and_up_both_families():
    with network(make_topology("two_path", family="dual")) as net:
        c1, s1 = net.netns("c1"), net.netns("s1")
        for dst, (path1, path2) in (("198.19.0.2", ("198.18.1.2", "198.18.2.2")),
                                    ("2001:db8:2::2", ("2001:db8:1:1::2", "2001:db8:1:2::2"))):
            listener = _Listener(s1, dst)
            try:
                assert _connect(c1, path1, dst, listener.port) and _connect(c1, path2, dst, listener.port)
                net.link_down("r1", "c1")
                assert "UP" not in _link(net.netns("r1"), "r1-eth0")[1]
                state, flags = _link(c1, "c1-eth0")  # c1's end stays up, and sees its carrier go
                assert state != "UP" and "UP" in flags and "LOWER_UP" not in flags, (state, flags)
                assert not _connect(c1, path1, dst, listener.port, timeout=0.5)
                assert _connect(c1, path2, dst, listener.port)
                net.link_up("r1", "c1")  # routes of r1 through r1-eth0 are back
                assert _connect(c1, path1, dst, listener.port, timeout=3)
            finally:
                listener.close()
        with pytest.raises(TopologyError, match=r"^link r1<->s1: no such link in this topology \(links: "):
            net.link_down("r1", "s1")
    assert _our_netns() == []


@needs_root
def test_blackhole_keeps_links_up_and_drops_everything():
    with network(make_topology("two_path")) as net:
        c1, s1 = net.netns("c1"), net.netns("s1")
        listener = _Listener(s1, "198.19.0.2")
        try:
            net.blackhole("r1")
            net.blackhole(1)  # the same path by number: idempotent
            assert sum("blackhole" in r for r in chains(net.netns("r1"))) == 1
            assert _link(c1, "c1-eth0")[0] == "UP"
            assert not _connect(c1, "198.18.1.2", "198.19.0.2", listener.port, timeout=0.5)
            assert _connect(c1, "198.18.2.2", "198.19.0.2", listener.port)
            net.unblackhole(1)
            assert not any("blackhole" in r for r in chains(net.netns("r1")) + chains(net.netns("r1"), 6))
            assert _connect(c1, "198.18.1.2", "198.19.0.2", listener.port, timeout=3)
        finally:
            listener.close()
        for bad in (0, 3, "r3", "rs", True):
            with pytest.raises(TopologyError, match=r"^path=.*: expected a path number 1\.\.2 or one of r1, r2$"):
                net.blackhole(bad)
    assert _our_netns() == []


@pytest.mark.usefixtures("fallback")
def test_link_down_mid_transfer_from_the_during_callback(tmp_path):
    """The Lab API: path 1 goes down while a two-subflow transfer runs over delayed links; the
    connection finishes over path 2 with every byte intact, and path 1 carries nothing after."""
    from conformance.endpoints.linux import EndpointFlags, MptcpConfig, PMEndpoint
    from conformance.lab import MB, Lab

    cut: list[float] = []
    with Cleanup() as cleanup:
        lab = Lab(make_topology("two_path", bw=10, delay="2ms"), tmp_path / "lab", cleanup)
        lab.configure("c1", MptcpConfig(subflows=2, endpoints=[
            PMEndpoint(lab.addresses("c1")[1], EndpointFlags.SUBFLOW, dev="c1-eth1")]))
        lab.configure("s1", MptcpConfig(subflows=2))

        def during(port: int) -> None:
            # Cut once path 1 has carried 1 MB of the 6 MB (the whole takes about 2.5 s at 2 x 10 Mbit/s).
            deadline = time.monotonic() + 20
            while _tx_bytes(lab.net.netns("r1"), "r1-eth1") < 1_000_000 and time.monotonic() < deadline:
                time.sleep(0.02)
            lab.link_down("r1", "c1")
            cut.append(time.time())

        transfer = lab.transfer(up=6 * MB, down=0, wait_subflows=2, timeout=60, during=during)
    assert cut, "the callback ran"
    assert transfer.client["ok"] and transfer.server["ok"], (transfer.client, transfer.server)
    assert transfer.client["subflows_before_bulk"] == 2
    path1 = transfer.segments("r1-eth1")  # r1 towards rs: what path 1 carried
    path2 = transfer.segments("r2-eth1")
    before = sum(s.payload for s in path1 if s.time < cut[0])
    assert before > 0, "path 1 carried data before the cut"
    # Allow for what was already on the 2 ms lines when the link went down.
    assert sum(s.payload for s in path1 if s.time > cut[0] + 0.05) == 0
    assert sum(s.payload for s in path2 if s.time > cut[0]) > 0
    assert _our_netns() == []


CHILD = r"""
import os, signal, sys, time
os.environ["MPTCP_CONFORMANCE_LINK_EMULATION"] = "fallback"
from conformance.net.names import release_run, run_prefix
from conformance.net.network import network
from conformance.net.registry import make_topology

signal.signal(signal.SIGINT, signal.default_int_handler)
try:
    with network(make_topology("two_path", delay="5ms", loss=1)) as net:
        helpers = [n._mpc_delay_line.pid for n in net.nodes() if getattr(n, "_mpc_delay_line", None)]
        print("up", run_prefix(), *helpers, flush=True)
        time.sleep(600)
finally:
    release_run()
"""


def _child() -> tuple[subprocess.Popen, str, list[int]]:
    proc = subprocess.Popen([sys.executable, "-c", CHILD], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("up "):
        proc.kill()
        pytest.fail(f"child run did not come up: {line!r} {proc.communicate(timeout=30)[1]}")
    _, prefix, *helpers = line.split()
    return proc, prefix, [int(p) for p in helpers]


def _wait_gone(pids: list[int], timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def _last_resort(proc: subprocess.Popen, prefix: str, helpers: list[int]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    for name in os.listdir("/run/netns"):
        if name.startswith(prefix + "-"):
            remove_netns(name)
    for pid in helpers:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    (STATE_DIR / f"{prefix}.json").unlink(missing_ok=True)


@needs_root
def test_ctrl_c_removes_helpers_and_rules():
    proc, prefix, helpers = _child()
    try:
        assert len(helpers) == 3 and all(_alive(p) for p in helpers)
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert "KeyboardInterrupt" in err and "cleanup failed" not in err, err
        assert _wait_gone(helpers) == []
        assert not [n for n in os.listdir("/run/netns") if n.startswith(prefix + "-")]
    finally:
        _last_resort(proc, prefix, helpers)


@needs_root
def test_killed_run_helpers_exit_and_the_sweep_removes_the_rest():
    proc, prefix, helpers = _child()
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        # Their stdin closed with the owner: the helpers let their packets go and exit by themselves.
        assert _wait_gone(helpers) == []
        left = [n for n in os.listdir("/run/netns") if n.startswith(prefix + "-")]
        assert len(left) == 5  # the namespaces (and the rules inside) wait for the next run's sweep
        report = sweep_stale()
        assert set(left) <= set(report.removed_netns)
        assert not [n for n in os.listdir("/run/netns") if n.startswith(prefix + "-")]
    finally:
        _last_resort(proc, prefix, helpers)
