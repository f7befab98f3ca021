"""A running topology: Mininet with our node and link classes, owned by a Cleanup stack."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from mininet.log import setLogLevel
from mininet.net import Mininet

from conformance.errors import HarnessError
from conformance.net.cleanup import Cleanup, deferred_interrupts
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
        with deferred_interrupts():
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
