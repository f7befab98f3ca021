"""Topologies: the pure data (no root) and what `network()` really builds in namespaces (root)."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from conformance.errors import HarnessError, InputError, TopologyError
from conformance.net.cleanup import Cleanup
from conformance.net.names import run_prefix
from conformance.net.network import Network, network
from conformance.net.nodes import read_sysctl
from conformance.net.registry import make_topology, topologies
from conformance.net.shaping import LinkShape
from conformance.net.topo import FAMILIES, MAX_PATHS, MULTIHOMED, MptcpTopo
from conformance.proc import in_netns, run

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, veth, tc)")
IFNAMSIZ = 16  # including the terminating NUL


def _node_counts(multihomed: str, n: int) -> tuple[int, int]:
    """(nodes, links) of PathTopo with n paths."""
    if multihomed == "both":
        return n + 2, 2 * n  # c1, s1, r1..rn
    return n + 3, 2 * n + 1  # plus rs (client) or rc (server) and its link to the endpoint


SHAPES = [("two_path", {}, 5, 5), ("two_path_server", {}, 5, 5)] + [
    ("n_path", {"n": n, "multihomed": mh}, *_node_counts(mh, n))
    for mh in MULTIHOMED for n in range(1, MAX_PATHS + 1)]

# A smaller set for the heavier routing checks.
ROUTING_CASES = [("two_path", {}), ("two_path_server", {})] + [
    ("n_path", {"n": n, "multihomed": mh}) for mh in MULTIHOMED for n in (1, 3, MAX_PATHS)]


def _ids(cases) -> list[str]:
    return [name + "".join(f",{k}={v}" for k, v in params.items()) for name, params, *_ in cases]


def _versions(family: str) -> tuple[int, ...]:
    return {"ipv4": (4,), "ipv6": (6,), "dual": (4, 6)}[family]


def _ports(topo: MptcpTopo) -> list[tuple[str, str, list[ipaddress.IPv4Interface | ipaddress.IPv6Interface],
                                       str, str, list]]:
    """(node, intf, addrs, peer node, peer intf, peer addrs) for every end of every link."""
    out = []
    for _, _, info in topo.links(withInfo=True):
        ends = [(info[f"node{i}"], f"{info[f'node{i}']}-eth{info[f'port{i}']}",
                 [ipaddress.ip_interface(a) for a in info.get(f"params{i}", {}).get("addrs", [])])
                for i in (1, 2)]
        out.append((*ends[0], *ends[1]))
        out.append((*ends[1], *ends[0]))
    return out


def _our_netns() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return sorted(line.split()[0] for line in out.splitlines()
                  if line.strip() and line.split()[0].startswith(run_prefix() + "-"))


# --- pure data (no root) -----------------------------------------------------------------------

def test_registry_lists_the_shipped_topologies():
    assert {"two_path", "two_path_server", "n_path"} <= set(topologies())


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("name", sorted(topologies()))
def test_every_registered_topology_builds_as_a_topo(name, fam):
    topo = make_topology(name, family=fam)
    assert isinstance(topo, MptcpTopo)
    assert topo.family == fam
    assert {topo.client, topo.server} <= set(topo.nodes())
    assert topo.paths and all(topo.nodeInfo(r)["role"] == "router" for r in topo.paths)
    for node in topo.nodes():
        info = topo.nodeInfo(node)
        assert info["role"] in ("host", "router")
        assert isinstance(info["routes"], list) and isinstance(info["rules"], list)
    versions = {ipaddress.ip_address(a).version for n in topo.nodes() for a in topo.addresses(n)}
    assert versions == set(_versions(fam))
    for node, intf in topo.interfaces():
        assert len(intf) < IFNAMSIZ, f"{node}: interface name {intf!r} too long for the kernel"


@pytest.mark.parametrize(("name", "params", "nodes", "links"), SHAPES, ids=_ids(SHAPES))
@pytest.mark.parametrize("fam", FAMILIES)
def test_node_and_link_counts(name, params, nodes, links, fam):
    topo = make_topology(name, family=fam, **params)
    assert len(topo.nodes()) == nodes
    assert len(topo.links()) == links
    assert len(topo.interfaces()) == 2 * links
    assert len(set(topo.interfaces())) == 2 * links  # no interface name used twice
    assert len(topo.paths) == params.get("n", 2)


def test_two_path_layout():
    topo = make_topology("two_path")
    assert sorted(topo.nodes()) == ["c1", "r1", "r2", "rs", "s1"]
    assert [topo.nodeInfo(n)["role"] for n in sorted(topo.nodes())] == [
        "host", "router", "router", "router", "host"]
    assert topo.paths == ["r1", "r2"]
    peers = {(node, intf): peer for node, intf, _, peer, _, _ in _ports(topo)}
    assert peers == {
        ("c1", "c1-eth0"): "r1", ("c1", "c1-eth1"): "r2",
        ("r1", "r1-eth0"): "c1", ("r1", "r1-eth1"): "rs",
        ("r2", "r2-eth0"): "c1", ("r2", "r2-eth1"): "rs",
        ("rs", "rs-eth0"): "r1", ("rs", "rs-eth1"): "r2", ("rs", "rs-eth2"): "s1",
        ("s1", "s1-eth0"): "rs",
    }
    assert sorted(topo.interfaces("c1")) == [("c1", "c1-eth0"), ("c1", "c1-eth1")]


def test_two_path_server_layout():
    topo = make_topology("two_path_server")
    assert sorted(topo.nodes()) == ["c1", "r1", "r2", "rc", "s1"]
    peers = {(node, intf): peer for node, intf, _, peer, _, _ in _ports(topo)}
    assert peers[("c1", "c1-eth0")] == "rc"
    assert peers[("s1", "s1-eth0")] == "r1" and peers[("s1", "s1-eth1")] == "r2"
    assert sorted(i for _, i in topo.interfaces("rc")) == ["rc-eth0", "rc-eth1", "rc-eth2"]


@pytest.mark.parametrize("multihomed", MULTIHOMED)
def test_n_path_interface_i_leads_to_router_i(multihomed):
    topo = make_topology("n_path", n=MAX_PATHS, multihomed=multihomed)
    peers = {(node, intf): peer for node, intf, _, peer, _, _ in _ports(topo)}
    multi = {"client": ["c1"], "server": ["s1"], "both": ["c1", "s1"]}[multihomed]
    for node in multi:
        for i in range(1, MAX_PATHS + 1):
            assert peers[(node, f"{node}-eth{i - 1}")] == f"r{i}"


@pytest.mark.parametrize(("fam", "c1", "s1"), [
    ("ipv4", ["198.18.1.2", "198.18.2.2"], ["198.19.0.2"]),
    ("ipv6", ["2001:db8:1:1::2", "2001:db8:1:2::2"], ["2001:db8:2::2"]),
    ("dual", ["198.18.1.2", "2001:db8:1:1::2", "198.18.2.2", "2001:db8:1:2::2"],
     ["198.19.0.2", "2001:db8:2::2"]),
])
def test_two_path_addresses(fam, c1, s1):
    topo = make_topology("two_path", family=fam)
    assert topo.addresses("c1") == c1
    assert topo.addresses("s1") == s1
    assert topo.addresses("c1", 4) == [a for a in c1 if ":" not in a]
    assert topo.addresses("c1", 6) == [a for a in c1 if ":" in a]
    assert topo.addresses("r1", 4) == (["198.18.1.1", "198.19.1.1"] if fam != "ipv6" else [])


@pytest.mark.parametrize(("fam", "c1", "s1"), [
    ("ipv4", ["198.18.0.2"], ["198.19.1.2", "198.19.2.2"]),
    ("ipv6", ["2001:db8:1::2"], ["2001:db8:2:1::2", "2001:db8:2:2::2"]),
])
def test_two_path_server_addresses(fam, c1, s1):
    topo = make_topology("two_path_server", family=fam)
    assert topo.addresses("c1") == c1
    assert topo.addresses("s1") == s1


def test_n_path_addresses_use_hex_path_numbers_in_ipv6():
    topo = make_topology("n_path", n=8, multihomed="both", family="dual")
    assert topo.addresses("c1", 4) == [f"198.18.{i}.2" for i in range(1, 9)]
    assert topo.addresses("s1", 6) == [f"2001:db8:2:{i:x}::2" for i in range(1, 9)]


@pytest.mark.parametrize(("name", "params"), ROUTING_CASES, ids=_ids(ROUTING_CASES))
@pytest.mark.parametrize("fam", FAMILIES)
def test_link_addressing(name, params, fam):
    topo = make_topology(name, family=fam, **params)
    seen = set()
    for node, intf, addrs, peer, _, peer_addrs in _ports(topo):
        assert sorted(a.version for a in addrs) == list(_versions(fam)), (node, intf)
        for mine, theirs in zip(addrs, peer_addrs, strict=True):
            assert mine.network == theirs.network, (node, intf, peer)
            assert mine.ip != theirs.ip
            assert mine.ip in (mine.network[1], mine.network[2])
            assert str(mine.ip) not in seen, f"{mine.ip} used twice"
            seen.add(str(mine.ip))


@pytest.mark.parametrize(("name", "params"), ROUTING_CASES, ids=_ids(ROUTING_CASES))
@pytest.mark.parametrize("fam", FAMILIES)
def test_routing_plan(name, params, fam):
    topo = make_topology(name, family=fam, **params)
    ports = _ports(topo)
    subnets = {a.network for p in ports for a in p[2]}
    for node in topo.nodes():
        info = topo.nodeInfo(node)
        mine = [p for p in ports if p[0] == node]
        if info["role"] == "router":
            assert info["rules"] == [], node
            attached = {a.network for p in mine for a in p[2]}
            routed = info["routes"]
            assert all("table" not in r for r in routed), node
            dsts = [ipaddress.ip_network(r["dst"]) for r in routed]
            assert len(dsts) == len(set(dsts)), f"{node}: duplicate routes"
            assert set(dsts) == subnets - attached, f"{node}: routes {dsts}"
            for r in routed:  # the next hop is a neighbour on the subnet of the interface named
                out = next(p for p in mine if p[1] == r["dev"])
                assert any(ipaddress.ip_address(r["via"]) in a.network for a in out[2]), (node, r)
                assert any(str(a.ip) == r["via"] for a in out[5]), (node, r)
            continue
        # Hosts: per interface, one table; per interface and family, one rule selecting it.
        rules, routes = info["rules"], info["routes"]
        assert len(rules) == len(mine) * len(_versions(fam)), node
        tables = {}
        for _, intf, addrs, _, _, peer_addrs in mine:
            for addr in addrs:
                rule = [r for r in rules if r["src"] == f"{addr.ip}/{addr.max_prefixlen}"]
                assert len(rule) == 1, (node, intf, addr)
                tables.setdefault(intf, set()).add(rule[0]["table"])
                table = rule[0]["table"]
                gw = next(str(p.ip) for p in peer_addrs if p.version == addr.version)
                default = "0.0.0.0/0" if addr.version == 4 else "::/0"
                in_table = [r for r in routes if r.get("table") == table
                            and ipaddress.ip_network(r["dst"]).version == addr.version]
                assert {"dst": default, "via": gw, "dev": intf, "table": table} in in_table
                assert {"dst": str(addr.network), "dev": intf, "src": str(addr.ip), "table": table} in in_table
        assert all(len(t) == 1 for t in tables.values()), f"{node}: an interface uses several tables"
        assert len({next(iter(t)) for t in tables.values()}) == len(mine), f"{node}: tables shared"
        priorities = {r["priority"] for r in rules}
        assert len(priorities) == len(mine) and all(p < 32766 for p in priorities)  # before main
        for version in _versions(fam):  # one main-table default per family
            default = "0.0.0.0/0" if version == 4 else "::/0"
            assert len([r for r in routes if "table" not in r and r["dst"] == default]) == 1, node


@pytest.mark.parametrize(("params", "match"), [
    ({"n": 0}, r"\b(paths|n)=0: expected an integer from 1 to 8"),
    ({"n": 9}, r"\b(paths|n)=9: expected an integer from 1 to 8"),
    ({"n": "2"}, r"\b(paths|n)='2': expected an integer"),
    ({"family": "ipx"}, r"family='ipx': expected one of ipv4, ipv6, dual"),
    ({"multihomed": "x"}, r"multihomed='x': expected one of client, server, both"),
])
def test_bad_topology_params(params, match):
    with pytest.raises(TopologyError, match=match):
        make_topology("n_path", **params)


def test_unknown_topology_names_the_known_ones():
    with pytest.raises(InputError, match=r"unknown topology 'three_path'; known: n_path, two_path"):
        make_topology("three_path")


def test_delay_is_data_until_build():
    """A Topo is pure data: a delay (which needs netem) is only checked when the network is built."""
    topo = make_topology("two_path", delay="10ms")
    shaped = [info for _, _, info in topo.links(withInfo=True) if info.get("delay") == "10ms"]
    assert len(shaped) == 4  # the path links; rs--s1 is not a path link


@pytest.mark.parametrize(("params", "match"), [
    ({"bw": -1}, r"bw=-1: expected a positive number of Mbit/s"),
    ({"bw": 0}, r"bw=0: expected a positive number"),
    ({"bw": "fast"}, r"bw='fast': expected a positive number"),
    ({"loss": 200}, r"loss=200: expected a percentage between 0 and 100"),
    ({"loss": -1}, r"loss=-1: expected a percentage"),
    ({"delay": "fast"}, r"delay='fast': expected a time such as '10ms'"),
    ({"jitter": "10 parsecs"}, r"jitter='10 parsecs': expected a time"),
    ({"max_queue_size": 0}, r"max_queue_size=0: expected a positive packet count"),
    ({"max_queue_size": 1.5}, r"max_queue_size=1.5: expected a positive packet count"),
])
def test_link_shape_rejects_bad_values(params, match):
    with pytest.raises(TopologyError, match=match):
        LinkShape.from_params(**params)


def test_link_shape_parses_times():
    assert LinkShape.from_params(delay="10ms").delay_ms == 10.0
    assert LinkShape.from_params(delay="500us").delay_ms == 0.5
    assert LinkShape.from_params(delay="0.1s").delay_ms == 100.0
    assert LinkShape.from_params(delay=5).delay_ms == 5.0
    assert LinkShape.from_params().empty
    assert not LinkShape.from_params(bw=10).needs_netem
    assert not LinkShape.from_params(bw=10).empty
    for params in ({"delay": "1ms"}, {"loss": 1}, {"delay": "1ms", "jitter": "1ms"}):
        assert LinkShape.from_params(**params).needs_netem


@pytest.mark.parametrize("params, words", [
    ({"jitter": "1ms"}, "needs a delay"),
    ({"delay": -5}, "negative"),
    ({"delay": True}, "expected a time"),
    ({"bw": True}, "positive number"),
])
def test_link_shape_rejects_nonsense(params, words):
    with pytest.raises(TopologyError, match=words):
        LinkShape.from_params(**params)


def test_misspelt_link_parameter_fails_without_root():
    with pytest.raises(TopologyError, match="bandwidth"):
        make_topology("two_path", bandwidth=10)
    with pytest.raises(TopologyError, match="bw=-1"):
        make_topology("two_path", bw=-1)


def test_n_path_names_its_own_parameter():
    with pytest.raises(TopologyError, match="n=0"):
        make_topology("n_path", n=0)


def test_network_without_root_is_a_harness_error(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    cleanup = Cleanup()
    with pytest.raises(HarnessError, match="needs root"):
        Network(make_topology("two_path"), cleanup)
    assert len(cleanup) == 0  # nothing was created, nothing to undo


# --- what network() builds (root) --------------------------------------------------------------

def _ipj(ns: str, *args: str):
    return json.loads(run(["ip", "-n", ns, "-j", *args]).stdout or "[]")


def _kernel_routes(ns: str, version: int) -> list[dict]:
    return _ipj(ns, f"-{version}", "route", "show", "table", "all")


def _matches(planned: dict, kernel: dict) -> bool:
    dst = ipaddress.ip_network(planned["dst"])
    want_dst = "default" if dst.prefixlen == 0 else str(dst)
    return (kernel.get("dst") == want_dst and kernel.get("dev") == planned["dev"]
            and kernel.get("gateway") == planned.get("via")
            and kernel.get("table", "main") == str(planned.get("table", "main"))
            and (planned.get("src") is None or kernel.get("prefsrc") == planned["src"]))


def _assert_no_leftovers() -> None:
    assert _our_netns() == [], "namespaces left behind"


@contextlib.contextmanager
def _tcp_server(ns: str, af: int, addr: str):
    with in_netns(ns):
        ls = socket.socket(af, socket.SOCK_STREAM)
    try:
        ls.bind((addr, 0))
        ls.listen(16)
        ls.settimeout(5)
        yield ls
    finally:
        ls.close()


def _connect_from(ns: str, af: int, src: str, dst: str, port: int) -> tuple[str, int]:
    with in_netns(ns):
        c = socket.socket(af, socket.SOCK_STREAM)
    with c:
        c.settimeout(5)
        c.bind((src, 0))
        c.connect((dst, port))
        return c.getsockname()[:2]


@pytest.fixture(scope="class", params=FAMILIES)
def built(request):
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, veth, tc)")
    topo = make_topology("two_path", family=request.param)
    with network(topo) as net:
        yield topo, net
    _assert_no_leftovers()


@needs_root
class TestTwoPathBuilt:
    """two_path brought up once per family (the class-scoped fixture is torn down before
    any other test builds a network: node names, hence namespace names, are per run)."""

    def test_namespaces_are_named_by_run_prefix(self, built):
        topo, net = built
        assert _our_netns() == sorted(f"{run_prefix()}-{n}" for n in topo.nodes())
        for node in topo.nodes():
            assert net.netns(node) == f"{run_prefix()}-{node}"

    def test_addresses_and_links_in_namespaces(self, built):
        topo, net = built
        for node in topo.nodes():
            links = {link["ifname"]: link for link in _ipj(net.netns(node), "addr", "show")}
            assert set(links) == {"lo"} | {i for _, i in topo.interfaces(node)}, node
            for _, intf, addrs, *_ in [p for p in _ports(topo) if p[0] == node]:
                link = links[intf]
                assert link["operstate"] == "UP", (node, intf)
                have = {(a["local"], a["prefixlen"]) for a in link["addr_info"] if a["scope"] == "global"}
                assert have == {(str(a.ip), a.network.prefixlen) for a in addrs}, (node, intf)
            # Veth ends never show up in the root namespace.
            root_links = {link["ifname"] for link in json.loads(run(["ip", "-j", "link"]).stdout)}
            assert not root_links & {i for _, i in topo.interfaces(node)}

    def test_routes_and_rules_in_namespaces(self, built):
        topo, net = built
        for node in topo.nodes():
            ns, info = net.netns(node), topo.nodeInfo(node)
            for version in _versions(topo.family):
                kernel = _kernel_routes(ns, version)
                planned = [r for r in info["routes"] if ipaddress.ip_network(r["dst"]).version == version]
                assert planned, (node, version)
                for route in planned:
                    assert any(_matches(route, k) for k in kernel), f"{node}: route {route} missing in {kernel}"
                rules = _ipj(ns, f"-{version}", "rule")
                ours = [r for r in rules if r.get("priority") not in (0, 32766, 32767)]
                want = [r for r in info["rules"]
                        if ipaddress.ip_network(r["src"], strict=False).version == version]
                assert len(ours) == len(want), (node, rules)
                for rule in want:
                    src = str(ipaddress.ip_network(rule["src"], strict=False).network_address)
                    assert any(k.get("src") == src and k.get("table") == str(rule["table"])
                               and k.get("priority") == rule["priority"] for k in ours), (node, rule, rules)
        # The facts the brief spells out, in kernel terms.
        c1 = net.netns("c1")
        for version in _versions(topo.family):
            assert len([r for r in _ipj(c1, f"-{version}", "rule") if r.get("table") in ("100", "101")]) == 2
        routers = [n for n in topo.nodes() if topo.nodeInfo(n)["role"] == "router"]
        assert sorted(routers) == ["r1", "r2", "rs"]

    def test_forwarding_and_offloads(self, built):
        topo, net = built
        for node in topo.nodes():
            ns = net.netns(node)
            forward = read_sysctl(ns, "net.ipv4.ip_forward")
            rp_filter = read_sysctl(ns, "net.ipv4.conf.all.rp_filter")
            assert forward == ("1" if topo.nodeInfo(node)["role"] == "router" else "0"), node
            assert rp_filter == "0", node
            for _, intf in topo.interfaces(node):
                features = {}
                for line in run(["ethtool", "-k", intf], netns=ns).stdout.splitlines():
                    key, _, value = line.strip().partition(":")
                    features[key] = value.split()[0] if value.split() else ""
                for feature in ("tcp-segmentation-offload", "generic-segmentation-offload",
                                "generic-receive-offload"):
                    assert features[feature] == "off", (node, intf, feature)

    def test_every_client_address_reaches_the_server(self, built):
        topo, net = built
        for version in _versions(topo.family):
            af = socket.AF_INET if version == 4 else socket.AF_INET6
            clients, servers = topo.addresses("c1", version), topo.addresses("s1", version)
            assert len(clients) == 2 and len(servers) == 1
            for dst in servers:
                with _tcp_server(net.netns("s1"), af, dst) as ls:
                    port = ls.getsockname()[1]
                    for src in clients:
                        assert _connect_from(net.netns("c1"), af, src, dst, port)[0] == src
                        conn, peer = ls.accept()
                        conn.close()
                        assert peer[0] == src  # no NAT, no rewriting on the way


@needs_root
def test_bw_link_gets_htb():
    topo = make_topology("two_path", bw=10)
    with network(topo) as net:
        shaped = set()
        for node in topo.nodes():
            for _, intf in topo.interfaces(node):
                kinds = {q["kind"] for q in json.loads(run(["tc", "-j", "qdisc", "show", "dev", intf],
                                                          netns=net.netns(node)).stdout)}
                if "htb" in kinds:
                    shaped.add(intf)
                    classes = run(["tc", "class", "show", "dev", intf], netns=net.netns(node)).stdout
                    assert "rate 10Mbit" in classes, (node, intf, classes)
        # Both ends of the four path links; the rs--s1 link carries no shape.
        assert shaped == {"c1-eth0", "c1-eth1", "r1-eth0", "r1-eth1", "r2-eth0", "r2-eth1",
                          "rs-eth0", "rs-eth1"}
    _assert_no_leftovers()


@needs_root
def test_bad_shape_fails_at_build_and_leaves_nothing():
    with pytest.raises(TopologyError, match=r"bw=-1: expected a positive number"), \
            network(make_topology("two_path", bw=-1)):
        pytest.fail("the network came up with bw=-1")
    _assert_no_leftovers()


@needs_root
@pytest.mark.parametrize("fam", FAMILIES)
def test_with_block_leaves_no_namespace(fam):
    topo = make_topology("two_path", family=fam)
    with network(topo) as net:
        assert len(_our_netns()) == 5
        pids = [n.pid for n in net.nodes()]
        assert all(os.path.exists(f"/proc/{p}") for p in pids)
    _assert_no_leftovers()
    for pid in pids:
        assert not _alive(pid), f"node shell {pid} survived the with block"


@needs_root
def test_exception_in_with_block_still_tears_down():
    with pytest.raises(RuntimeError, match="case failed"), network(make_topology("two_path")):
        assert len(_our_netns()) == 5
        raise RuntimeError("case failed")
    _assert_no_leftovers()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
