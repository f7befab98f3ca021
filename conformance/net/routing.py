"""Static routes and source-policy rules derived from a topology graph.

Routers get a route to every subnet they are not attached to, via the first hop of a shortest
path that transits routers only. Endpoint hosts get, per interface, a routing table whose default
route leaves by that interface and a rule selecting it by source address: so each MPTCP subflow
leaves by the interface that owns its source address (what a multihomed host needs)."""

from __future__ import annotations

import ipaddress
from collections import deque
from dataclasses import dataclass, field

TABLE_BASE = 100
RULE_PRIORITY_BASE = 1000


@dataclass
class Port:
    node: str
    intf: str
    index: int  # Mininet port number
    addrs: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]


@dataclass
class Plan:
    routes: dict[str, list[dict]] = field(default_factory=dict)
    rules: dict[str, list[dict]] = field(default_factory=dict)


def derive(roles: dict[str, str], links: list[tuple[Port, Port]]) -> Plan:
    """Compute routes and rules for every node. `roles` maps node name to 'host' or 'router'."""
    neighbours: dict[str, list[tuple[Port, Port]]] = {n: [] for n in roles}
    attached: dict[ipaddress._BaseNetwork, set[str]] = {}
    for a, b in links:
        neighbours[a.node].append((a, b))
        neighbours[b.node].append((b, a))
        for p in (a, b):
            for addr in p.addrs:
                attached.setdefault(addr.network, set()).add(p.node)
    plan = Plan({n: [] for n in roles}, {n: [] for n in roles})

    for node in roles:
        mine = {a.network for p, _ in neighbours[node] for a in p.addrs}
        for net, owners in attached.items():
            if net in mine:
                continue
            hop = _first_hop(node, owners, roles, neighbours)
            if hop is None:
                continue
            out, peer = hop
            via = _peer_addr(peer, net.version)
            if via is not None and roles[node] == "router":
                plan.routes[node].append({"dst": str(net), "via": str(via), "dev": out.intf})
        if roles[node] == "host":
            _host_policy(node, neighbours[node], roles, plan)
    return plan


def _peer_addr(peer: Port, version: int):
    return next((a.ip for a in peer.addrs if a.version == version), None)


def _first_hop(start, targets, roles, neighbours):
    """First (our port, peer port) on a shortest path from start to any node in targets,
    transiting routers only."""
    seen = {start}
    queue = deque()
    for mine, peer in neighbours[start]:
        queue.append((peer.node, (mine, peer)))
    while queue:
        node, first = queue.popleft()
        if node in seen:
            continue
        seen.add(node)
        if node in targets:
            return first
        if roles[node] != "router":
            continue
        for _, peer in neighbours[node]:
            if peer.node not in seen:
                queue.append((peer.node, first))
    return None


def _host_policy(node, ports, roles, plan):
    """Per-interface tables for a host, and a main-table default via its first gateway."""
    defaults_done: set[int] = set()
    for mine, peer in sorted(ports, key=lambda pp: pp[0].index):
        if roles[peer.node] != "router":
            continue
        table = TABLE_BASE + mine.index
        for addr in mine.addrs:
            gw = _peer_addr(peer, addr.version)
            if gw is None:
                continue
            default = "0.0.0.0/0" if addr.version == 4 else "::/0"
            plan.routes[node].append({"dst": str(addr.network), "dev": mine.intf, "src": str(addr.ip),
                                      "table": table})
            plan.routes[node].append({"dst": default, "via": str(gw), "dev": mine.intf, "table": table})
            plan.rules[node].append({"src": f"{addr.ip}/{addr.max_prefixlen}", "table": table,
                                     "priority": RULE_PRIORITY_BASE + mine.index})
            if addr.version not in defaults_done:
                plan.routes[node].append({"dst": default, "via": str(gw), "dev": mine.intf})
                defaults_done.add(addr.version)
