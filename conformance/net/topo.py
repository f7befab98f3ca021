"""Topology declarations: Mininet `Topo` classes for multipath scenarios, with no switch at all.

A Topo here is pure data (it builds without root): nodes are our Host and Router classes, links
are veth pairs carrying their addresses, and routes are derived from the graph when the
declaration is complete. The same object runs under the suite and under `mn --custom`.

Address plan (RFC 2544 benchmarking range and the IPv6 documentation prefix):
  path i, client side   198.18.i.0/24   2001:db8:1:i::/64   router .1, client (or rc) .2
  path i, server side   198.19.i.0/24   2001:db8:2:i::/64   router .1, server (or rs) .2
  rc -- c1              198.18.0.0/24   2001:db8:1:0::/64   (server-multihomed variant)
  rs -- s1              198.19.0.0/24   2001:db8:2:0::/64   (client-multihomed variant)
"""

from __future__ import annotations

import ipaddress

from mininet.topo import Topo

from conformance.errors import TopologyError
from conformance.net.links import VethLink
from conformance.net.nodes import Host, Router
from conformance.net.routing import Port, derive
from conformance.net.shaping import LinkShape

FAMILIES = ("ipv4", "ipv6", "dual")
MULTIHOMED = ("client", "server", "both")
MAX_PATHS = 8


class MptcpTopo(Topo):
    """Base class: endpoint hosts, routers, addressed veth links, derived routing."""

    client = "c1"
    server = "s1"

    def __init__(self, *args, family: str = "ipv4", **params):
        if family not in FAMILIES:
            raise TopologyError(f"family={family!r}: expected one of {', '.join(FAMILIES)}")
        self.family = family
        self.paths: list[str] = []  # router of each path, in path order
        # Routers a guest kernel plays (router -> Debian kernel version), with the shape its netem
        # gives the path (conformance.endpoints.guest.router).
        self.guest_routers: dict[str, tuple[str, LinkShape]] = {}
        super().__init__(*args, **params)
        self._derive_routing()

    def add_endpoint(self, name: str) -> str:
        return self.addHost(name, cls=Host, role="host")

    def add_router(self, name: str) -> str:
        return self.addHost(name, cls=Router, role="router")

    def wire(self, a: str, b: str, v4: str, v6: str, **shape) -> None:
        """Link a (host .1 / ::1) and b (.2 / ::2) on subnets v4/v6, keeping the families asked for."""
        try:
            LinkShape.from_params(**shape)  # bad or misspelt link parameters fail here, without root
        except TypeError as exc:
            raise TopologyError(f"link {a}<->{b}: {exc}".replace("from_params()", "link parameters")) from None
        nets = []
        if self.family in ("ipv4", "dual"):
            nets.append(ipaddress.ip_network(v4))
        if self.family in ("ipv6", "dual"):
            nets.append(ipaddress.ip_network(v6))
        a_addrs = [f"{net[1]}/{net.prefixlen}" for net in nets]
        b_addrs = [f"{net[2]}/{net.prefixlen}" for net in nets]
        self.addLink(a, b, cls=VethLink, params1={"addrs": a_addrs}, params2={"addrs": b_addrs}, **shape)

    def addresses(self, node: str, version: int | None = None) -> list[str]:
        """The addresses of `node`, in port order (the first is its primary address)."""
        out = []
        for port in sorted(self._ports(node), key=lambda p: p.index):
            out += [str(a.ip) for a in port.addrs if version in (None, a.version)]
        return out

    def interfaces(self, node: str | None = None) -> list[tuple[str, str]]:
        """(node, interface) for every interface, or those of one node."""
        return [(p.node, p.intf) for a, b in self._port_pairs() for p in (a, b) if node in (None, p.node)]

    def _ports(self, node: str) -> list[Port]:
        return [p for a, b in self._port_pairs() for p in (a, b) if p.node == node]

    def _port_pairs(self) -> list[tuple[Port, Port]]:
        pairs = []
        for _, _, info in self.links(sort=False, withInfo=True):
            ends = tuple(
                Port(info[f"node{i}"], f"{info[f'node{i}']}-eth{info[f'port{i}']}", info[f"port{i}"],
                     [ipaddress.ip_interface(a) for a in info.get(f"params{i}", {}).get("addrs", [])])
                for i in (1, 2))
            pairs.append(ends)
        return pairs

    def _derive_routing(self) -> None:
        roles = {n: self.nodeInfo(n).get("role", "host") for n in self.nodes()}
        plan = derive(roles, self._port_pairs())
        for node in roles:
            info = self.nodeInfo(node)
            info["routes"] = plan.routes[node]
            info["rules"] = plan.rules[node]


class PathTopo(MptcpTopo):
    """N disjoint paths between a client and a server, each through its own router r<i>.

      multihomed="client":   c1 =eth<i-1>= r<i> == rs -- s1
      multihomed="server":   c1 -- rc == r<i> =eth<i-1>= s1
      multihomed="both":     c1 =eth<i-1>= r<i> =eth<i-1>= s1
    """

    def build(self, paths: int = 2, multihomed: str = "client", guest_router: str | None = None, **shape):
        """guest_router="6.12" (or "r2:6.12"): that path's router (r1 by default) is Debian's 6.12
        kernel in a QEMU guest, whose netem gives the path its delay=, jitter= and loss=."""
        if not isinstance(paths, int) or not 1 <= paths <= MAX_PATHS:
            raise TopologyError(f"paths={paths!r}: expected an integer from 1 to {MAX_PATHS}")
        if multihomed not in MULTIHOMED:
            raise TopologyError(f"multihomed={multihomed!r}: expected one of {', '.join(MULTIHOMED)}")
        self.multihomed = multihomed
        self.add_endpoint(self.client)
        self.add_endpoint(self.server)
        client_side, server_side = self.client, self.server
        if multihomed == "server":
            client_side = self.add_router("rc")
            self.wire(client_side, self.client, "198.18.0.0/24", "2001:db8:1:0::/64")
        if multihomed == "client":
            server_side = self.add_router("rs")
        guest = None
        if guest_router is not None:
            router, _, version = str(guest_router).rpartition(":")
            router = router or "r1"
            if not version or router not in [f"r{i}" for i in range(1, paths + 1)]:
                raise TopologyError(f"guest_router={guest_router!r}: expected VERSION or r<i>:VERSION, i from 1 "
                                    f"to {paths}")
            guest = router
            self.guest_routers[router] = (version, LinkShape.from_params(**shape))
        for i in range(1, paths + 1):
            r = self.add_router(f"r{i}")
            self.paths.append(r)
            # A guest router's netem is its path's delay, jitter and loss: no emulation here as well.
            link = {k: v for k, v in shape.items() if k in ("bw", "max_queue_size")} if r == guest else shape
            self.wire(r, client_side, f"198.18.{i}.0/24", f"2001:db8:1:{i:x}::/64", **link)
            self.wire(r, server_side, f"198.19.{i}.0/24", f"2001:db8:2:{i:x}::/64", **link)
        if multihomed == "client":
            self.wire(server_side, self.server, "198.19.0.0/24", "2001:db8:2:0::/64")
