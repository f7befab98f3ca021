"""A running topology: Mininet with our node and link classes, owned by a Cleanup stack.

Link events act on it while it runs (for instance from a transfer's `during=` callback):
`link_down(node, peer)` / `link_up(node, peer)`, and `blackhole(path)` / `unblackhole(path)`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from mininet.log import setLogLevel
from mininet.net import Mininet

from conformance.errors import HarnessError, TopologyError
from conformance.net.cleanup import Cleanup, deferred_interrupts
from conformance.net.emulation import delay_lines, owned_by, set_blackhole, set_link_state
from conformance.net.links import VethIntf, VethLink
from conformance.net.nodes import Host, NetnsNode
from conformance.net.topo import MptcpTopo


class Network:
    """Build `topo` now; everything it creates is undone by `cleanup` (or by `stop()`)."""

    def __init__(self, topo: MptcpTopo, cleanup: Cleanup):
        if os.geteuid() != 0:
            raise HarnessError("building a topology needs root (network namespaces, veth, tc)")
        self.topo = topo
        setLogLevel(os.environ.get("MPTCP_CONFORMANCE_MININET_LOG", "error"))
        # Mininet.init() would raise machine-wide limits and sysctls; nothing outside our
        # namespaces is ours to change.
        Mininet.inited = True
        self.mn = Mininet(topo=topo, controller=None, host=Host, link=VethLink, intf=VethIntf,
                          build=False, autoSetMacs=False, waitConnected=False)
        cleanup.defer("stop topology", self.stop)
        self.cleanup = cleanup
        self._blackholed: set[str] = set()
        with deferred_interrupts(), owned_by(cleanup):  # link emulation registers its own undo
            self.mn.build()
        for node in self.nodes():
            node.close_netlink()  # a netlink socket per node is a forked helper: release after build

    def nodes(self) -> list[NetnsNode]:
        return list(self.mn.hosts)

    def __getitem__(self, name: str) -> NetnsNode:
        return self.mn[name]

    def netns(self, name: str) -> str:
        return self.mn[name].netns

    @property
    def client(self) -> NetnsNode:
        return self.mn[self.topo.client]

    @property
    def server(self) -> NetnsNode:
        return self.mn[self.topo.server]

    # -- link events ----------------------------------------------------------------------------
    def link(self, node: str, peer: str) -> tuple[VethIntf, VethIntf]:
        """(the interface on `node`, the one on `peer`) of the link between them."""
        found = []
        for link in self.mn.links:
            for a, b in ((link.intf1, link.intf2), (link.intf2, link.intf1)):
                if a.node.name == node and b.node.name == peer:
                    found.append((a, b))
        if not found:
            links = ", ".join(sorted(f"{lk.intf1.node.name}-{lk.intf2.node.name}" for lk in self.mn.links))
            raise TopologyError(f"link {node}<->{peer}: no such link in this topology (links: {links})")
        if len(found) > 1:
            raise TopologyError(f"link {node}<->{peer}: {len(found)} links join these nodes")
        return found[0]

    def link_down(self, node: str, peer: str) -> None:
        """Take the link between `node` and `peer` down mid-run: `node`'s end is set down, so
        `peer` sees its carrier go, as when a cable is pulled at `node`. Nothing crosses the link
        either way until link_up."""
        mine, _ = self.link(node, peer)
        set_link_state(self.netns(node), mine.name, up=False, routes=[])

    def link_up(self, node: str, peer: str) -> None:
        """Bring the link back; `node`'s routes through it, which the kernel dropped, are put back."""
        mine, _ = self.link(node, peer)
        routes = [r for r in self.topo.nodeInfo(node).get("routes", []) if r["dev"] == mine.name]
        set_link_state(self.netns(node), mine.name, up=True, routes=routes)

    def _path_router(self, path: str | int) -> str:
        routers = list(self.topo.paths)
        if isinstance(path, int) and not isinstance(path, bool) and 1 <= path <= len(routers):
            return routers[path - 1]
        if path in routers:
            return path
        raise TopologyError(f"path={path!r}: expected a path number 1..{len(routers)} or one of "
                            f"{', '.join(routers)}")

    def blackhole(self, path: str | int) -> None:
        """Silently drop every IP packet reaching path `path`'s router (r<i>, or its number), both
        ways: the links stay up, nothing gets through (ARP still answers)."""
        router = self._path_router(path)
        set_blackhole(self.netns(router), True)
        if router not in self._blackholed:  # the rule also goes with the namespace; this says so
            self._blackholed.add(router)
            self.cleanup.defer(f"end blackhole of {router}", set_blackhole, self.netns(router), False)

    def unblackhole(self, path: str | int) -> None:
        set_blackhole(self.netns(self._path_router(path)), False)

    def delay_stats(self) -> dict[str, dict]:
        """What each node's delay line measured (packets, release error, drops), by node."""
        return {name: line.stats() for name, line in delay_lines(self.nodes()).items()}

    def stop(self) -> None:
        if self.mn is not None:
            mn, self.mn = self.mn, None
            for node in mn.hosts:
                node.terminate()


@contextmanager
def network(topo: MptcpTopo) -> Iterator[Network]:
    """Context manager form: the topology is gone when the block ends, however it ends."""
    with Cleanup() as cleanup:
        yield Network(topo, cleanup)
