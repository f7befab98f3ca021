"""Two disjoint paths between an MPTCP client and server, each through its own router.

two_path (the client is multihomed; policy routing sends each source address out of its own
interface):

         198.18.1.0/24          198.19.1.0/24
    +--- c1-eth0 ---- r1 ---- rs-eth0 ---+
    c1                                   rs ---- s1      198.19.0.0/24 (s1 = 198.19.0.2)
    +--- c1-eth1 ---- r2 ---- rs-eth1 ---+
         198.18.2.0/24          198.19.2.0/24

two_path_server (the server is multihomed, the client single-homed behind rc):

    c1 ---- rc ==== r1, r2 ==== s1-eth0 (198.19.1.2), s1-eth1 (198.19.2.2)

IPv6 mirrors the plan under 2001:db8:1:<path>::/64 (client side) and 2001:db8:2:<path>::/64
(server side). Parameters: family=ipv4|ipv6|dual, and shaping of the path links: bw= (Mbit/s),
delay= and jitter= (ms, or '10ms', '500us'), loss= (percent), max_queue_size= (packets); without
netem, delay, jitter and loss are emulated by conformance.net.emulation. Routers r<i> are where
middleboxes attach.

    mn --custom topologies/two_path.py --topo two_path --controller none
    mn --custom topologies/two_path.py --topo two_path,family=dual --controller none
"""

import inspect
import sys
from pathlib import Path

# `mn --custom` exec()s this file without __file__; the code object still knows its path.
sys.path.insert(0, str(Path(inspect.currentframe().f_code.co_filename).resolve().parents[1]))
import conformance.mn_bootstrap  # noqa: F401  (our dependencies under the system mn)
from conformance.net.topo import PathTopo


class TwoPath(PathTopo):
    def build(self, **shape):
        super().build(paths=2, multihomed="client", **shape)


class TwoPathServer(PathTopo):
    def build(self, **shape):
        super().build(paths=2, multihomed="server", **shape)


topos = {"two_path": TwoPath, "two_path_server": TwoPathServer}
