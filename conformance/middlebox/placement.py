"""Where a middlebox sits: a router's interfaces facing the client and the server, read from the
topology's graph (Mininet's public Topo API), so profiles work on any topology's routers."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from mininet.topo import Topo

from conformance.errors import TopologyError


@dataclass(frozen=True)
class Side:
    intf: str
    addrs: tuple[str, ...]  # the router's own addresses on it


@dataclass(frozen=True)
class Placement:
    """Router `router`: interfaces towards the client and towards the server."""

    router: str
    client: tuple[Side, ...]
    server: tuple[Side, ...]

    def ingress(self, direction: str) -> tuple[str, ...]:
        """The interfaces packets of `direction` arrive on (none: every interface, for "both")."""
        if direction == "both":
            return ()
        return tuple(s.intf for s in (self.client if direction == "c2s" else self.server))

    def server_address(self, side: Side, version: int) -> str | None:
        return next((a for a in side.addrs if ipaddress.ip_address(a).version == version), None)


def routers(topo: Topo) -> list[str]:
    return [n for n in topo.nodes() if topo.nodeInfo(n).get("role") == "router"]


def place(topo: Topo, router: str, client: str, server: str) -> Placement:
    """The client- and server-facing interfaces of `router`: those its routing (connected subnets,
    then the routes the topology derived for it) sends the client's and the server's addresses to."""
    if router not in routers(topo):
        raise TopologyError(f"router {router!r} not one of this topology's routers: {', '.join(routers(topo))}")
    sides: list[tuple[Side, list]] = []  # the router's interfaces and their subnets
    endpoints: dict[str, list[str]] = {client: [], server: []}
    for _, _, info in topo.links(sort=False, withInfo=True):
        for i in (1, 2):
            node, declared = info[f"node{i}"], info.get(f"params{i}", {}).get("addrs", [])
            ifaces = [ipaddress.ip_interface(x) for x in declared]
            if node == router:
                sides.append((Side(f"{router}-eth{info[f'port{i}']}", tuple(str(x.ip) for x in ifaces)),
                              [x.network for x in ifaces]))
            elif node in endpoints:
                endpoints[node] += [str(x.ip) for x in ifaces]
    by_intf = {side.intf: side for side, _ in sides}
    routes = topo.nodeInfo(router).get("routes", [])

    def egress(addr: str) -> str | None:
        ip = ipaddress.ip_address(addr)
        for side, nets in sides:
            if any(ip in net for net in nets):
                return side.intf
        found = [(ipaddress.ip_network(r["dst"]), r["dev"]) for r in routes
                 if r.get("table", 254) == 254 and ip.version == ipaddress.ip_network(r["dst"]).version
                 and ip in ipaddress.ip_network(r["dst"])]
        return max(found, key=lambda f: f[0].prefixlen)[1] if found else None

    towards = {node: {egress(a) for a in addrs} - {None} for node, addrs in endpoints.items()}
    both = towards[client] & towards[server]
    if not towards[client] or not towards[server] or both:
        raise TopologyError(f"router {router} is not between {client} and {server} (towards {client}: "
                            f"{sorted(towards[client])}, towards {server}: {sorted(towards[server])})")
    return Placement(router, tuple(by_intf[i] for i in sorted(towards[client])),
                     tuple(by_intf[i] for i in sorted(towards[server])))
