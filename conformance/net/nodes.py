"""Mininet node classes: a host and a Linux router, each in a *named* network namespace.

Mininet starts each node's shell in an anonymous namespace; we bind it as `<run prefix>-<node>`
right away so that our tools (pyroute2, tcpdump, the endpoints) can enter it by name and so that
a killed run's namespaces can be found and removed by the next run."""

from __future__ import annotations

import contextlib
import ipaddress
from pathlib import Path
from typing import ClassVar

from mininet.node import Node
from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

from conformance.net.names import netns_name, remove_netns
from conformance.proc import in_netns

_BASE_SYSCTLS = {
    # Multihomed hosts receive replies on an interface other than the one a route points to.
    "net/ipv4/conf/all/rp_filter": "0",
    "net/ipv4/conf/default/rp_filter": "0",
    # Addresses must be usable at once: no duplicate address detection delay.
    "net/ipv6/conf/all/accept_dad": "0",
    "net/ipv6/conf/default/accept_dad": "0",
    "net/ipv6/conf/default/accept_ra": "0",
}
_ROUTER_SYSCTLS = {"net/ipv4/ip_forward": "1", "net/ipv6/conf/all/forwarding": "1"}


def write_sysctls(netns: str, values: dict[str, str]) -> dict[str, str]:
    """Write sysctls (slash or dot form) inside `netns`; return their previous values."""
    before = {}
    with in_netns(netns):
        for key, value in values.items():
            path = Path("/proc/sys") / key.replace(".", "/")
            before[key] = path.read_text().strip()
            path.write_text(f"{value}\n")
    return before


def read_sysctl(netns: str, key: str) -> str:
    with in_netns(netns):
        return (Path("/proc/sys") / key.replace(".", "/")).read_text().strip()


class NetnsNode(Node):
    """A Mininet node whose namespace is also bound as `/run/netns/<prefix>-<name>`."""

    role = "host"
    sysctls: ClassVar[dict[str, str]] = _BASE_SYSCTLS

    def __init__(self, name: str, **params):
        self.netns = netns_name(name)
        self._attached = False
        self._ipr: IPRoute | None = None
        super().__init__(name, inNamespace=True, **params)

    def startShell(self, mnopts=None):
        super().startShell(mnopts)
        try:
            pr_netns.attach(self.netns, self.pid)
            self._attached = True
            write_sysctls(self.netns, self.sysctls)
        except BaseException:
            self.terminate()
            raise

    def ipr(self) -> IPRoute:
        """A netlink socket inside this node's namespace (kept for the node's life)."""
        if self._ipr is None:
            self._ipr = IPRoute(netns=self.netns)
        return self._ipr

    def config(self, routes=(), rules=(), sysctls=None, **_mininet_defaults):
        """Apply the routes and policy rules the topology derived for this node.

        Mininet's own defaults (ip from ipBase, mac, defaultRoute) are ignored on purpose: our
        addresses are declared per interface on the links."""
        ipr = self.ipr()
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=lo, state="up")
        if sysctls:
            write_sysctls(self.netns, sysctls)
        for rule in rules:
            net = ipaddress.ip_network(rule["src"], strict=False)
            ipr.rule("add", family=10 if net.version == 6 else 2, src=str(net.network_address),
                     src_len=net.prefixlen, table=rule["table"], priority=rule["priority"])
        for route in routes:
            ipr.route("add", **route_request(route, ipr.link_lookup(ifname=route["dev"])[0]))
        return {}

    def close_netlink(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    def terminate(self):
        self.close_netlink()
        with contextlib.suppress(Exception):
            super().terminate()
        if self._attached:  # never remove a namespace of the same name that is not ours
            remove_netns(self.netns)
            self._attached = False


class Host(NetnsNode):
    """An MPTCP endpoint host (client or server)."""


class Router(NetnsNode):
    """A Linux router in the middle of a path; middleboxes attach here."""

    role = "router"
    sysctls: ClassVar[dict[str, str]] = {**_BASE_SYSCTLS, **_ROUTER_SYSCTLS}


def route_request(route: dict, oif: int) -> dict:
    """pyroute2 `route()` arguments for one route of the topology plan (dst, via, src, table) out
    of interface index `oif`."""
    dst = ipaddress.ip_network(route["dst"])
    kw: dict = {"family": 10 if dst.version == 6 else 2, "table": route.get("table", 254), "oif": oif}
    if route.get("via"):
        kw["gateway"] = route["via"]
    else:
        kw["scope"] = 253  # link
    if route.get("src"):
        kw["prefsrc"] = route["src"]
    if dst.prefixlen:
        kw.update(dst=str(dst.network_address), dst_len=dst.prefixlen)
    return kw
