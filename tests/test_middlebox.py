"""Middlebox profiles: validation, the rules a profile becomes, the BPF payload tests (no root);
installation, hits, and removal from a router's namespace, also after Ctrl-C (root)."""

from __future__ import annotations

import itertools
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from scapy.all import IP, TCP, IPv6, IPv6ExtHdrDestOpt, Raw, raw

from conformance.errors import HarnessError, TopologyError
from conformance.middlebox import PROFILES, Match, Profile, ProfileError, Snat, StripOption, bpf, profile
from conformance.middlebox.placement import place
from conformance.middlebox.rules import NTH_EVERY, Rule, plan
from conformance.net.registry import make_topology

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, iptables, nft)")
REPO = Path(__file__).resolve().parents[1]


# --- profiles as data --------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PROFILES))
def test_builtin_profiles_round_trip_through_plain_data(name):
    p = PROFILES[name]
    assert Profile.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    assert p.description


def _data(**changes):
    data = {"name": "x", "match": {"segment": "syn", "mptcp": True}, "action": {"kind": "strip-option"},
            "direction": "c2s"}
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    return data


@pytest.mark.parametrize("changes, message", [
    ({"match": {"segment": "syns"}},
     "profile 'x': match.segment 'syns' not one of syn, synack, third-ack, data, pure-ack, any"),
    ({"action": {"kind": "strp_option"}},
     "profile 'x': action.kind 'strp_option' not one of strip-option, drop, rewrite-payload, clamp-mss, snat, "
     "rewrite-seq, resegment, coalesce, alg, tcp-proxy"),
    ({"direction": "up"}, "profile 'x': direction 'up' not one of c2s, s2c, both"),
    ({"from_packet": 0}, "profile 'x': from_packet 0 not in 1..1000000"),
    ({"from_packet": "3"}, "profile 'x': from_packet '3' is not an integer"),
    ({"from_packet": True}, "profile 'x': from_packet True is not an integer"),
    ({"action": {"kind": "strip-option", "option": 300}}, "profile 'x': action.option 300 not in 2..255"),
    ({"action": {"kind": "strip-option", "mss": 1000}},
     "profile 'x': action.mss: unknown field (known: kind, option)"),
    ({"match": {"segmnet": "syn"}}, "profile 'x': match.segmnet: unknown field (known: segment, mptcp, nth)"),
    ({"match": {"segment": "syn", "mptcp": "yes"}}, "profile 'x': match.mptcp 'yes' is not true or false"),
    ({"match": {"segment": "data", "nth": 0}}, "profile 'x': match.nth 0 not in 1..1000000"),
    ({"match": {"segment": "synack"}}, "profile 'x': direction 'c2s': a synack only travels s2c"),
    ({"match": {"segment": "third-ack"}, "from_packet": 3},
     "profile 'x': from_packet: the third ACK is always packet 2 of its direction"),
    ({"match": {"segment": "any"}, "action": {"kind": "snat"}, "direction": "both"},
     "profile 'x': direction 'both': snat translates client connections (c2s)"),
    ({"match": {"segment": "any"}, "action": {"kind": "snat", "ports": [30000, 20000]}},
     "profile 'x': action.ports 30000-20000: low port above high port"),
    ({"match": {"segment": "pure-ack"}, "action": {"kind": "rewrite-payload"}, "direction": "both"},
     "profile 'x': match.segment 'pure-ack': rewrite-payload needs data segments"),
    ({"action": {"kind": "rewrite-payload", "xor": 0}}, "profile 'x': action.xor 0 not in 1..255"),
    ({"match": {"segment": "data"}, "action": {"kind": "clamp-mss"}},
     "profile 'x': match.segment 'data': clamp-mss acts on SYNs (syn, synack or any)"),
    ({"name": "bad name"}, "profile name 'bad name' is not a non-empty word of letters, digits, -_."),
    ({"match": None}, "match: missing"),
    ({"actions": []}, "actions: unknown field (known: name, description, match, action, direction, from_packet)"),
])
def test_bad_profile_data_names_the_field_in_one_line(changes, message):
    with pytest.raises(ProfileError) as exc:
        Profile.from_dict(_data(**changes), "strip-syn.toml")
    assert str(exc.value) == f"strip-syn.toml: {message}"
    assert "\n" not in str(exc.value)


def test_profiles_validate_when_built_in_code_too():
    with pytest.raises(ProfileError, match=r"^profile 'p': direction 's2c': a syn only travels c2s$"):
        Profile("p", Match("syn"), StripOption(), "s2c")
    with pytest.raises(ProfileError, match=r"^action.ports \(1, 2, 3\) is not a \[low, high\] pair$"):
        Snat(ports=(1, 2, 3))
    with pytest.raises(ProfileError, match=r"^profile 'nope' not one of strip-mptcp-syn, "):
        profile("nope")
    later = profile("strip-mptcp-all", from_packet=4, direction="s2c")
    assert (later.from_packet, later.direction, later.name) == (4, "s2c", "strip-mptcp-all")
    with pytest.raises(ProfileError, match=r"^profile 'strip-mptcp-syn': direction 's2c'"):
        profile("strip-mptcp-syn", direction="s2c")


# --- placement and rules -----------------------------------------------------------------------

def test_router_sides_come_from_the_topology():
    topo = make_topology("two_path", family="dual")
    r1 = place(topo, "r1", "c1", "s1")
    assert [s.intf for s in r1.client] == ["r1-eth0"] and [s.intf for s in r1.server] == ["r1-eth1"]
    assert r1.server[0].addrs == ("198.19.1.1", "2001:db8:2:1::1")
    assert r1.ingress("c2s") == ("r1-eth0",) and r1.ingress("s2c") == ("r1-eth1",) and r1.ingress("both") == ()
    rs = place(topo, "rs", "c1", "s1")
    assert [s.intf for s in rs.client] == ["rs-eth0", "rs-eth1"] and [s.intf for s in rs.server] == ["rs-eth2"]
    rc = place(make_topology("two_path_server"), "rc", "c1", "s1")
    assert [s.intf for s in rc.client] == ["rc-eth0"] and [s.intf for s in rc.server] == ["rc-eth1", "rc-eth2"]
    with pytest.raises(TopologyError, match=r"^router 'c1' not one of this topology's routers: r1, r2, rs$"):
        place(topo, "c1", "c1", "s1")


def _plan(name, family="dual", **changes):
    topo = make_topology("two_path", family=family)
    families = {"ipv4": (4,), "ipv6": (6,), "dual": (4, 6)}[family]
    return plan(profile(name, **changes), place(topo, "r1", "c1", "s1"), families, prefix="mpc42", number=7)


def test_strip_syn_rules():
    p = _plan("strip-mptcp-syn")
    comment = ["-m", "comment", "--comment", "mpc42 middlebox 7: strip-mptcp-syn"]
    assert p.chain == "mpc42-mb7"
    assert p.chains == (("iptables", "mangle"), ("ip6tables", "mangle"))
    assert p.rules[0].argv() == ["iptables", "-t", "mangle", "-A", "mpc42-mb7", "-p", "tcp",
                                 "--tcp-flags", "SYN,ACK", "SYN", "-m", "tcp", "--tcp-option", "30", *comment,
                                 "-j", "TCPOPTSTRIP", "--strip-options", "30"]
    assert [j.argv() for j in p.jumps] == [
        [tool, "-t", "mangle", "-A", "FORWARD", "-i", "r1-eth0", *comment, "-j", "mpc42-mb7"]
        for tool in ("iptables", "ip6tables")]
    install = [argv for argv, _ in p.install()]
    assert install[:2] == [["iptables", "-t", "mangle", "-N", "mpc42-mb7"], ["ip6tables", "-t", "mangle", "-N",
                                                                           "mpc42-mb7"]]
    assert install[-2:] == [j.argv() for j in p.jumps]  # jumps go in last
    removal = p.removal()
    assert removal[:2] == [j.argv("-D") for j in p.jumps]  # and come out first
    assert removal[-1] == ["ip6tables", "-t", "mangle", "-X", "mpc42-mb7"]
    assert all("mpc42" in " ".join(argv) for argv in install + removal)


def test_third_ack_pure_ack_from_and_nth_matches():
    third = _plan("strip-mptcp-third-ack", "ipv4").rules[0].spec
    assert third[:5] == ("-p", "tcp", "--tcp-flags", "SYN,ACK,FIN,RST", "ACK")
    assert third[9:15] == ("-m", "connbytes", "--connbytes", "2:2", "--connbytes-dir", "original")
    code = third[third.index("--bytecode") + 1]
    assert bpf.parse(code) == bpf.payload_length(4, "eq", 0)
    later = _plan("strip-mptcp-all", "ipv6", from_packet=5, direction="s2c")
    spec = later.rules[0].spec
    assert spec[spec.index("--connbytes") + 1] == "5:" and spec[spec.index("--connbytes-dir") + 1] == "reply"
    assert [j.spec[:2] for j in later.jumps] == [("-i", "r1-eth1")]
    assert later.rules[0].tool == "ip6tables"
    both = _plan("strip-mptcp-pure-ack", "ipv4")
    assert [j.spec[0] for j in both.jumps] == ["-m"]  # no interface: both directions
    nth = _plan("corrupt-data", "ipv4").rules[0].spec
    assert nth[nth.index("statistic") - 1:][:8] == ("-m", "statistic", "--mode", "nth", "--every",
                                                    str(NTH_EVERY), "--packet", "4")
    assert nth.index("statistic") > nth.index("--bytecode")  # counted after every other match


def test_rewrite_snat_clamp_drop_rules():
    rewrite = _plan("corrupt-data", "dual")
    assert not rewrite.rules[0].counts  # the nft counter counts the rewritten segments
    assert rewrite.rules[0].spec[-4:] == ("-j", "MARK", "--set-xmark", "0x4d420007/0xffffffff")
    (table,) = rewrite.nft
    assert (table.family, table.name) == ("inet", "mpc42-mb7")
    assert "meta mark 0x4d420007 @ih,80,16 set @ih,80,16 ^ 0xff00 counter" in table.script
    data = rewrite.rules[0].spec
    assert bpf.parse(data[data.index("--bytecode") + 1]) == bpf.payload_length(4, "gt", 11)
    snat = _plan("snat", "dual")
    assert snat.chains == (("iptables", "nat"), ("ip6tables", "nat"))
    assert [r.spec[:2] + r.spec[-2:] for r in snat.rules] == [
        ("-o", "r1-eth1", "--to-source", "198.19.1.1:20000-20999"),
        ("-o", "r1-eth1", "--to-source", "[2001:db8:2:1::1]:20000-20999")]
    assert {j.table + "/" + j.chain for j in snat.jumps} == {"nat/POSTROUTING"}
    clamp = _plan("clamp-mss", "ipv4").rules[0].spec
    assert clamp[-7:] == ("--tcp-flags", "SYN,RST", "SYN", "-j", "TCPMSS", "--set-mss", "1200")
    drop = _plan("drop-mptcp-syn", "ipv4")
    assert drop.chains == (("iptables", "filter"),) and drop.rules[0].spec[-2:] == ("-j", "DROP")


def test_helped_profiles_feed_their_helper():
    seq = _plan("rewrite-seq", "dual")
    assert [r.spec[-4:] for r in seq.rules] == [("-j", "NFQUEUE", "--queue-num", str(0x6D07))] * 2
    assert "--queue-bypass" not in seq.rules[0].spec and all(r.counts for r in seq.rules)
    assert not any("-i" in j.spec for j in seq.jumps)  # both directions: every interface
    split = _plan("resegment", "ipv4")
    data = split.rules[0].spec
    assert bpf.parse(data[data.index("--bytecode") + 1]) == bpf.payload_length(4, "gt", 0)
    assert [j.spec[:2] for j in split.jumps] == [("-i", "r1-eth0")]  # c2s: from the client's side
    proxy = _plan("tcp-proxy", "dual")
    assert proxy.chains == (("iptables", "nat"), ("ip6tables", "nat"))
    assert proxy.rules[0].spec[-4:] == ("-j", "REDIRECT", "--to-ports", "47007")
    assert {(j.table, j.chain, j.spec[:2]) for j in proxy.jumps} == {("nat", "PREROUTING", ("-i", "r1-eth0"))}
    for bad in ({"direction": "c2s"}, {"from_packet": 3}):
        with pytest.raises(ProfileError, match="rewrite-seq shifts whole subflows"):
            profile("rewrite-seq", **bad)
    with pytest.raises(ProfileError, match="tcp-proxy takes whole client connections"):
        profile("tcp-proxy", direction="both")


# --- the rewriter's packet changes, on scapy-built packets ------------------------------------------

def _seg(src, sport, dst, dport, flags, seq=0, ack=0, payload=b"", options=(), v6=False):
    ip = IPv6(src=src, dst=dst) if v6 else IP(src=src, dst=dst)
    return raw(ip / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, options=list(options))
               / Raw(payload))


def _valid(pkt: bytes):
    parsed = (IP if pkt[0] >> 4 == 4 else IPv6)(pkt)
    again = parsed.copy()
    del again[TCP].chksum
    assert (IP if pkt[0] >> 4 == 4 else IPv6)(raw(again))[TCP].chksum == parsed[TCP].chksum, "bad TCP checksum"
    return parsed


@pytest.mark.parametrize("v6", [False, True])
def test_rewrite_seq_shifts_one_way_and_shifts_back_the_other(v6):
    from conformance.middlebox.rewriter import Rewriter

    c, s = ("2001:db8:1:1::2", "2001:db8:2::2") if v6 else ("198.18.1.2", "198.19.0.2")
    rw = Rewriter("rewrite-seq", 1000)
    syn = _valid(rw.handle(_seg(c, 40000, s, 80, "S", seq=0xFFFFFF00, v6=v6))[0])
    assert syn[TCP].seq == (0xFFFFFF00 + 1000) & 0xFFFFFFFF  # wraps
    shifted = (0xFFFFFF00 + 1001) & 0xFFFFFFFF  # the server acknowledges the shifted SYN
    back = _valid(rw.handle(_seg(s, 80, c, 40000, "SA", seq=5, ack=shifted,
                                 options=[("SAck", (shifted, shifted + 100))], v6=v6))[0])
    assert back[TCP].ack == 0xFFFFFF01 and back[TCP].seq == 5
    assert dict(back[TCP].options)["SAck"] == (0xFFFFFF01, 0xFFFFFF01 + 100)
    assert rw.handle(_seg(c, 40001, s, 80, "A", seq=7, v6=v6)) is None  # a flow whose SYN it never saw
    assert rw.stats["flows"] == [{"client": f"{c}:40000", "server": f"{s}:80", "offset": 1000}]
    randomised = Rewriter("rewrite-seq", 0)
    randomised.handle(_seg(c, 40000, s, 80, "S", seq=1, v6=v6))
    assert randomised.stats["flows"][0]["offset"] >= 1 << 20


@pytest.mark.parametrize("v6", [False, True])
def test_resegment_splits_with_the_options_copied(v6):
    from conformance.middlebox.rewriter import Rewriter
    from conformance.wire import DSS

    c, s = ("2001:db8:1:1::2", "2001:db8:2::2") if v6 else ("198.18.1.2", "198.19.0.2")
    data = bytes(range(256)) * 5  # 1280 bytes
    dss = DSS(flags="AaMm", data_ack=1, dsn=100, ssn=1, data_level_length=1280)
    rw = Rewriter("resegment", 500)
    original = _seg(c, 40000, s, 80, "PA", seq=1000, payload=data, options=[dss], v6=v6)
    pieces = [_valid(p) for p in rw.handle(original)]
    assert [len(p[TCP].payload) for p in pieces] == [500, 500, 280]
    assert [p[TCP].seq for p in pieces] == [1000, 1500, 2000]
    assert b"".join(bytes(p[TCP].payload) for p in pieces) == data
    assert [str(p[TCP].flags) for p in pieces] == ["A", "A", "PA"]  # PSH (and FIN) on the last only
    options = (IP if not v6 else IPv6)(original)[TCP].options
    assert options and all(p[TCP].options == options for p in pieces)
    assert rw.handle(_seg(c, 40000, s, 80, "A", seq=1, payload=b"x" * 500, v6=v6)) is None  # small enough
    assert (rw.stats["changed"], rw.stats["added"]) == (1, 2)


def test_alg_cuts_bytes_and_shifts_the_sequence_numbers_after_them_both_ways():
    from conformance.middlebox.rewriter import Rewriter

    c, s = "198.18.1.2", "198.19.0.2"
    isn = 0xFFFFFF00  # the shift crosses the 2^32 wrap
    data = bytes(range(100))
    rw = Rewriter("alg", 4, nth=2, at=10)
    assert rw.handle(_seg(c, 40000, s, 80, "S", seq=isn)) is None
    first = 1 + isn
    assert rw.handle(_seg(c, 40000, s, 80, "PA", seq=first & 0xFFFFFFFF, payload=data)) is None  # 1st: untouched
    second = (first + 100) & 0xFFFFFFFF
    cut = _valid(rw.handle(_seg(c, 40000, s, 80, "PA", seq=second, payload=data))[0])
    assert bytes(cut[TCP].payload) == data[:10] + data[14:] and cut[TCP].seq == second
    again = _valid(rw.handle(_seg(c, 40000, s, 80, "PA", seq=second, payload=data))[0])  # a retransmission
    assert bytes(again[TCP].payload) == data[:10] + data[14:]
    later = _valid(rw.handle(_seg(c, 40000, s, 80, "PA", seq=(second + 100) & 0xFFFFFFFF, payload=data))[0])
    assert later[TCP].seq == (second + 96) & 0xFFFFFFFF and bytes(later[TCP].payload) == data
    inside = _valid(rw.handle(_seg(c, 40000, s, 80, "PA", seq=(second + 12) & 0xFFFFFFFF, payload=data[:20]))[0])
    assert inside[TCP].seq == (second + 10) & 0xFFFFFFFF and bytes(inside[TCP].payload) == data[2:20]
    # The server acknowledges the shortened stream: its ACKs past the cut go back up by 4.
    ack = _valid(rw.handle(_seg(s, 80, c, 40000, "A", seq=9, ack=(second + 196) & 0xFFFFFFFF,
                                options=[("SAck", ((second + 5) & 0xFFFFFFFF, (second + 196) & 0xFFFFFFFF))]))[0])
    assert ack[TCP].ack == (second + 200) & 0xFFFFFFFF
    assert dict(ack[TCP].options)["SAck"] == ((second + 5) & 0xFFFFFFFF, (second + 200) & 0xFFFFFFFF)
    early = rw.handle(_seg(s, 80, c, 40000, "A", seq=9, ack=(second + 10) & 0xFFFFFFFF))
    assert _valid(early[0])[TCP].ack == (second + 10) & 0xFFFFFFFF  # up to the cut: unchanged
    assert rw.stats["flows"] == [{"client": f"{c}:40000", "server": f"{s}:80", "cut_at": 111, "bytes": 4}]


def test_coalesce_merges_what_follows_and_loses_the_second_options():
    from conformance.middlebox.rewriter import HOLD_S, Coalescer
    from conformance.wire import DSS

    c, s = "198.18.1.2", "198.19.0.2"
    first, second = (DSS(flags="AaMm", data_ack=1, dsn=100 + 500 * i, ssn=1 + 500 * i, data_level_length=500)
                     for i in range(2))
    co = Coalescer(1400)
    held = co.arrive(1, _seg(c, 40000, s, 80, "A", seq=1000, ack=7, payload=b"a" * 500, options=[first]), 0.0)
    assert held == []
    (merged_id, merged, drop), (second_id, none, dropped) = co.arrive(
        2, _seg(c, 40000, s, 80, "PA", seq=1500, ack=9, payload=b"b" * 500, options=[second]), 0.001)
    assert (merged_id, drop, second_id, none, dropped) == (1, False, 2, None, True)
    pkt = _valid(merged)
    assert bytes(pkt[TCP].payload) == b"a" * 500 + b"b" * 500 and pkt[TCP].ack == 9 and "P" in str(pkt[TCP].flags)
    assert pkt[TCP].options == IP(_seg(c, 40000, s, 80, "A", options=[first]))[TCP].options  # the first's only
    assert (co.stats["changed"], co.stats["options_lost"]) == (1, 1)
    # Not contiguous, or too big together: the held one goes on unchanged and the new one waits.
    co.arrive(3, _seg(c, 40000, s, 80, "A", seq=5000, payload=b"c" * 500), 0.0)
    assert co.arrive(4, _seg(c, 40000, s, 80, "A", seq=9000, payload=b"d" * 500), 0.0) == [(3, None, False)]
    assert co.arrive(5, _seg(c, 40000, s, 80, "A", seq=9500, payload=b"e" * 1000), 0.0) == [(4, None, False)]
    # A FIN is never held or merged: it releases what waits and goes on itself.
    assert co.arrive(6, _seg(c, 40000, s, 80, "FA", seq=10500), 0.0) == [(5, None, False), (6, None, False)]
    co.arrive(7, _seg(c, 40001, s, 80, "A", seq=1, payload=b"f" * 10), 1.0)
    assert co.due(1.0 + HOLD_S / 2) == [] and co.due(1.0 + HOLD_S) == [(7, None, False)]


# --- the BPF payload tests, run by our interpreter on real packets --------------------------------

def _v4(payload=b"", options=(), ip_options=b""):
    from scapy.layers.inet import IPOption

    pkt = IP(src="198.18.1.2", dst="198.19.0.2", options=[IPOption(ip_options)] if ip_options else [])
    return raw(pkt / TCP(flags="A", options=list(options)) / Raw(payload))


def _v6(payload=b"", ext=False):
    pkt = IPv6(src="2001:db8:1:1::2", dst="2001:db8:2::2")
    if ext:
        pkt = pkt / IPv6ExtHdrDestOpt()
    return raw(pkt / TCP(flags="A", options=[("Timestamp", (1, 2))]) / Raw(payload))


@pytest.mark.parametrize("packet, length", [
    (_v4(), 0), (_v4(b"x"), 1), (_v4(b"y" * 1400, options=[("Timestamp", (1, 2)), ("NOP", None)]), 1400),
    (_v4(b"abc", ip_options=b"\x94\x04\x00\x00"), 3), (_v6(), 0), (_v6(b"z" * 20), 20),
])
def test_bpf_payload_length_programs(packet, length):
    family = 6 if packet[0] >> 4 == 6 else 4
    for test, value in (("eq", 0), ("gt", 0), ("gt", 11), ("eq", length)):
        want = length == value if test == "eq" else length > value
        program = bpf.payload_length(family, test, value)
        assert bool(bpf.execute(program, packet)) == want, (test, value)
        assert bpf.parse(bpf.bytecode(program)) == program


def test_bpf_never_matches_what_it_cannot_parse():
    assert bpf.execute(bpf.payload_length(6, "eq", 0), _v6(ext=True)) == 0  # extension header
    assert bpf.execute(bpf.payload_length(4, "eq", 0), _v4()[:30]) == 0  # read past the end
    with pytest.raises(ValueError, match="family 5 not one of 4, 6"):
        bpf.payload_length(5, "eq", 0)


# --- installed in a router (root) ----------------------------------------------------------------

@pytest.fixture(scope="module")
def net():
    """two_path, dual stack (so iptables and ip6tables rules both go in), brought up once."""
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, iptables, nft)")
    from conformance import doctor
    from conformance.errors import CapabilityMissing
    from conformance.net.network import network

    try:
        doctor.require("iptables:TCPOPTSTRIP", "nft")
    except CapabilityMissing as exc:
        pytest.skip(f"this machine cannot run middleboxes: {exc}")
    with network(make_topology("two_path", family="dual")) as running:
        yield running


def _state(net, router="r1") -> str:
    from conformance.proc import run

    ns = net.netns(router)
    return "\n".join(run(argv, netns=ns).stdout for argv in (["iptables-save", "-c"], ["ip6tables-save", "-c"],
                                                              ["nft", "list", "ruleset"]))


def _processes(net, router="r1") -> list[int]:
    from conformance.net.names import pids_in_netns
    from conformance.proc import NETNS_DIR

    return sorted(pids_in_netns(NETNS_DIR / net.netns(router)))


@needs_root
@pytest.mark.parametrize("name", sorted(PROFILES))
def test_each_profile_installs_verified_and_leaves_nothing(net, name, tmp_path):
    from conformance.middlebox import attach
    from conformance.net.cleanup import Cleanup
    from conformance.net.names import run_prefix

    before, procs = _state(net), _processes(net)
    assert run_prefix() not in before
    with Cleanup() as cleanup:
        box = attach(name, net, cleanup=cleanup, router="r1", folder=tmp_path)
        state = _state(net)
        assert box.parts[0].plan.chain in state and f"{run_prefix()} middlebox" in state
        assert box.hits() == 0
        assert str(box.effect()).endswith("did not take effect: its rules never matched")
    after = _state(net)
    assert run_prefix() not in after
    assert box.parts[0].leftovers() == []
    assert _processes(net) == procs
    evidence = tmp_path / f"middlebox-{box.number}-{name}-r1.txt"
    assert box.parts[0].plan.chain in evidence.read_text()


@needs_root
def test_all_routers_and_a_failed_install_is_undone(net, monkeypatch):
    from conformance.middlebox import attach, engine
    from conformance.net.cleanup import Cleanup
    from conformance.net.names import run_prefix

    with Cleanup() as cleanup:
        box = attach("strip-mptcp-all", net, cleanup=cleanup, router="all")
        assert box.routers == ["r1", "r2"]
        assert run_prefix() in _state(net, "r1") and run_prefix() in _state(net, "r2")
    assert run_prefix() not in _state(net, "r1") + _state(net, "r2")

    real = engine.plan

    def broken(*args, **kwargs):
        p = real(*args, **kwargs)
        bad = Rule("iptables", "mangle", p.chain, ("-j", "NO-SUCH-TARGET"))
        return type(p)(p.chain, p.chains, (*p.rules, bad), p.jumps, p.nft)

    monkeypatch.setattr(engine, "plan", broken)
    cleanup = Cleanup()
    with pytest.raises(HarnessError, match=r"installing on r1 failed: command failed"):
        attach("strip-mptcp-syn", net, cleanup=cleanup)
    assert run_prefix() in _state(net)  # half-installed until the cleanup stack runs
    cleanup.run()
    assert run_prefix() not in _state(net)


_ports = itertools.count(7001)


def _transfer(net, folder: Path, *, size=200_000, mptcp=True, wait=30.0) -> dict | None:
    """A small transfer c1 -> s1 and back through r1 (no captures); the server's report (None if the
    server did not finish within `wait` seconds)."""
    from conformance.lab import TRANSFER
    from conformance.proc import Background, run

    port = str(next(_ports))
    common = ["--port", port, "--send", str(size), "--expect", str(size), "--timeout", "20",
              *([] if mptcp else ["--tcp"])]
    server = Background([*TRANSFER, "server", "--addr", "0.0.0.0", "--report", str(folder / "server.json"),
                         *common], netns=net.netns("s1"), stdout=folder / "server.out",
                        stderr=folder / "server.err")
    try:
        deadline = time.monotonic() + 10
        while "listening" not in server.output() and time.monotonic() < deadline:
            time.sleep(0.01)
        run([*TRANSFER, "client", "--addr", "198.19.0.2", "--report", str(folder / "client.json"), *common],
            netns=net.netns("c1"), timeout=40, check=False)
        deadline = time.monotonic() + wait
        while server.running() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        server.stop()
    report = folder / "server.json"
    return json.loads(report.read_text()) if report.exists() else None


@needs_root
@pytest.mark.parametrize("name, changes, mptcp, hits", [
    ("strip-mptcp-pure-ack", {}, True, range(1, 10_000)),
    ("strip-mptcp-all", {"from_packet": 4}, True, range(1, 10_000)),
    ("clamp-mss", {}, True, range(2, 3)),  # the SYN and the SYN/ACK
    ("strip-mptcp-syn", {}, False, range(0, 1)),  # a plain TCP SYN has nothing to strip
    ("rewrite-seq", {}, True, range(20, 10_000)),  # every segment, both ways
    ("resegment", {}, True, range(20, 10_000)),  # every client data segment
    ("tcp-proxy", {}, True, range(1, 2)),  # the one connection
    ("coalesce", {}, True, range(20, 10_000)),  # every client data segment is queued
])
def test_hits_count_what_the_middlebox_did(net, tmp_path, name, changes, mptcp, hits):
    from conformance.middlebox import attach
    from conformance.net.cleanup import Cleanup

    with Cleanup() as cleanup:
        box = attach(profile(name, **changes), net, cleanup=cleanup, folder=tmp_path)
        report = _transfer(net, tmp_path, mptcp=mptcp)
        effect = box.effect()
    assert report is not None and report["ok"], report
    assert effect.hits in hits, effect
    assert effect.took_effect == (hits.start > 0)
    assert box.hits() == effect.hits  # read once more after removal: the final counters
    helper = box.helper_reports().get("r1")
    if name == "rewrite-seq":
        assert helper["changed"] >= 20 and len(helper["flows"]) == 1, helper
    elif name == "resegment":
        assert helper["changed"] >= 20 and helper["added"] >= helper["changed"], helper
    elif name == "tcp-proxy":
        assert helper["connections"] == 1 and helper["c2s_bytes"] == helper["s2c_bytes"] == 200_000, helper


@needs_root
def test_snat_rewrites_address_and_port(net, tmp_path):
    from conformance.middlebox import attach
    from conformance.net.cleanup import Cleanup

    with Cleanup() as cleanup:
        box = attach("snat", net, cleanup=cleanup)
        report = _transfer(net, tmp_path, mptcp=False)
        assert box.hits() == 1  # one connection translated
    host, port = report["peer"]
    assert host.removeprefix("::ffff:") == "198.19.1.1" and 20000 <= port <= 20999, report["peer"]


@needs_root
def test_rewrite_passes_tcp_and_fails_the_dss_checksum(net, tmp_path):
    """One byte of the 5th client data segment flipped: plain TCP delivers it (its checksum holds);
    with DSS checksums the receiving MPTCP stack counts a checksum error. (What the kernel does
    next is for the conformance cases: here the transfer is not required to finish.)"""
    from conformance.endpoints.counters import delta, read_counters
    from conformance.endpoints.linux import MptcpConfig, configure
    from conformance.middlebox import attach
    from conformance.net.cleanup import Cleanup

    with Cleanup() as cleanup:
        box = attach("corrupt-data", net, cleanup=cleanup)
        before = read_counters(net["s1"].pid)
        (tmp_path / "tcp").mkdir()
        tcp = _transfer(net, tmp_path / "tcp", mptcp=False)
        assert box.hits() == 1
        assert tcp["ok"] is False and tcp["bytes_received"] == 200_000, tcp  # changed, not dropped
        assert delta(before, read_counters(net["s1"].pid)).get("TcpInCsumErrors", 0) == 0
    try:
        for node in ("c1", "s1"):
            configure(net[node], MptcpConfig(checksum=True))
        with Cleanup() as cleanup:
            box = attach("corrupt-data", net, cleanup=cleanup)
            before = read_counters(net["s1"].pid)
            (tmp_path / "mptcp").mkdir()
            _transfer(net, tmp_path / "mptcp", wait=5)
            assert box.hits() == 1
            assert delta(before, read_counters(net["s1"].pid)).get("MPTcpExtDataCsumErr", 0) >= 1
    finally:
        for node in ("c1", "s1"):
            configure(net[node], MptcpConfig())


CHILD = r"""
import signal, sys, time
from pathlib import Path
from conformance.middlebox import attach
from conformance.net.cleanup import Cleanup
from conformance.net.names import release_run, run_prefix
from conformance.net.network import Network
from conformance.net.registry import make_topology

signal.signal(signal.SIGINT, signal.default_int_handler)
try:
    with Cleanup() as cleanup:
        net = Network(make_topology("two_path"), cleanup)
        box = attach("strip-mptcp-syn", net, cleanup=cleanup, folder=Path(sys.argv[1]))
        print("up", run_prefix(), box.number, flush=True)
        time.sleep(600)
finally:
    release_run()
"""


@needs_root
def test_ctrl_c_removes_the_middlebox_before_the_topology(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        line = proc.stdout.readline() if ready else ""
        assert line.startswith("up "), f"child did not come up: {line!r}"
        _, prefix, number = line.split()
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert "KeyboardInterrupt" in err and "cleanup failed" not in err, err
        evidence = tmp_path / f"middlebox-{number}-strip-mptcp-syn-r1.txt"
        assert f"{prefix}-mb{number}" in evidence.read_text()  # removal ran, and read its counters first
        netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
        assert f"{prefix}-" not in netns
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_bundles_are_built_in_profiles_and_not_profiles_themselves():
    from conformance.middlebox import BUNDLES, PROFILES, ProfileError, profile

    assert BUNDLES["isp"] == ("strip-mptcp-syn", "clamp-mss")
    for name, members in BUNDLES.items():
        assert members and all(m in PROFILES for m in members), name
        with pytest.raises(ProfileError, match=rf"profile '{name}' not one of .*bundles, for Lab.middleboxes"):
            profile(name)
