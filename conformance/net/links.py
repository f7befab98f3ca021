"""Mininet link and interface classes: veth pairs made directly inside the two namespaces.

The pair is created with netlink in node 1's namespace with its peer placed in node 2's, so our
interfaces never appear in the root namespace (nothing to collide with a parallel run, nothing to
leak there). Addresses come from the topology; segmentation offloads are turned off so captures
show wire segments; shaping goes through conformance.net.shaping, and, where the kernel has no
netem, delay, jitter and loss through conformance.net.emulation (in netfilter, in the routers)."""

from __future__ import annotations

import functools
import ipaddress
import os

from mininet.link import Intf, Link
from pyroute2.ethtool.ioctl import IoctlEthtool

from conformance.errors import TopologyError
from conformance.net.emulation import Impairment, impair
from conformance.net.shaping import LinkShape, apply_shape
from conformance.proc import in_netns

IFA_F_NODAD = 0x02


def _is_offload(name: str) -> bool:
    """What `ethtool -K IF tso off gso off gro off` turns off: every TCP segmentation feature (new
    kernels add more, e.g. tx-tcp-accecn-segmentation), GSO and GRO."""
    return (name.startswith("tx-tcp") and name.endswith("-segmentation")) or name in (
        "tx-generic-segmentation", "rx-gro")


def offloads_off(netns: str, ifname: str) -> None:
    """Turn segmentation offloads off with the ethtool ioctl (no process per interface), then check."""
    with in_netns(netns):
        eth = IoctlEthtool(ifname)  # the socket belongs to the namespace it was opened in
    try:
        features = eth.get_features()
        wanted = [n for n in features.keys() if _is_offload(n)]  # noqa: SIM118 - iterating yields tuples
        for name in wanted:
            if features.is_available(name):
                features[name] = False
        eth.set_features(features)
        after = eth.get_features()
        still = [n for n in wanted if after[n]]
    finally:
        eth.close()
    if still:
        raise TopologyError(f"{netns}/{ifname}: cannot turn off offloads {still}")


# "fallback": emulate delay, jitter and loss with netfilter and the delay line even where netem exists.
EMULATION_ENV = "MPTCP_CONFORMANCE_LINK_EMULATION"


@functools.cache
def netem_available() -> bool:
    from conformance.doctor import probe_qdisc

    return probe_qdisc("netem").ok


def use_netem() -> bool:
    """Whether delay, jitter and loss go to netem (the doctor's probe qdisc:netem) or to the fallback."""
    return os.environ.get(EMULATION_ENV) != "fallback" and netem_available()


class VethIntf(Intf):
    """One end of a veth pair, configured through netlink."""

    def config(self, addrs=(), bw=None, delay=None, jitter=None, loss=None, max_queue_size=None,
               **_params):
        shape = LinkShape.from_params(bw=bw, delay=delay, jitter=jitter, loss=loss,
                                      max_queue_size=max_queue_size)
        ipr = self.node.ipr()
        index = ipr.link_lookup(ifname=self.name)[0]
        self.addrs = [ipaddress.ip_interface(a) for a in addrs]
        for a in self.addrs:
            ipr.addr("add", index=index, address=str(a.ip), prefixlen=a.network.prefixlen,
                     flags=IFA_F_NODAD if a.version == 6 else 0)
        offloads_off(self.node.netns, self.name)
        ipr.link("set", index=index, state="up")
        netem = use_netem() if shape.needs_netem else False
        apply_shape(self.node.netns, self.name, shape, netem_available=netem)
        self.shape = shape
        # What netem did not take of the shape of the packets leaving here (VethLink emulates it).
        self.unshaped = shape if shape.needs_netem and not netem else None
        v4 = [a for a in self.addrs if a.version == 4]
        if v4:  # what Mininet's CLI shows and pings
            self.ip, self.prefixLen = str(v4[0].ip), v4[0].network.prefixlen
        return {}

    def delete(self):
        # The pair disappears with its namespace; deleting it one end at a time only costs time.
        self.node.delIntf(self)
        self.link = None


class VethLink(Link):
    """A veth pair between two NetnsNodes (use with `cls=VethLink` in Topo.addLink)."""

    def __init__(self, node1, node2, **params):
        # Both ends must be ours whatever default interface class the caller (mn) passes.
        params["intf"] = VethIntf
        super().__init__(node1, node2, **params)
        # Without netem, each direction's loss and delay are emulated in netfilter: as the packets
        # leave a router, or as they arrive from an endpoint host (see conformance.net.emulation).
        self.impairments: list[Impairment] = []
        for sender, receiver in ((self.intf1, self.intf2), (self.intf2, self.intf1)):
            if sender.unshaped is None:
                continue
            if getattr(sender.node, "role", "host") == "router":
                imp = impair(sender.node, sender.name, "out", sender.unshaped)
            else:
                imp = impair(receiver.node, receiver.name, "in", sender.unshaped)
            if imp is not None:
                self.impairments.append(imp)

    @classmethod
    def makeIntfPair(cls, intfname1, intfname2, addr1=None, addr2=None, node1=None, node2=None,
                     deleteIntfs=True):
        if node1 is None or node2 is None or not hasattr(node1, "netns") or not hasattr(node2, "netns"):
            raise TopologyError(f"VethLink {intfname1}<->{intfname2} needs two NetnsNode ends")
        peer = {"ifname": intfname2, "net_ns_fd": node2.netns}
        if addr2:
            peer["address"] = addr2
        kw = {"address": addr1} if addr1 else {}
        node1.ipr().link("add", ifname=intfname1, kind="veth", peer=peer, **kw)
        return None, None
