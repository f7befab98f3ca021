"""N disjoint paths (1 to 8) between an MPTCP client and server, each through its own router.

    c1 =eth<i-1>= r<i> == rs -- s1        multihomed=client (default)
    c1 -- rc == r<i> =eth<i-1>= s1        multihomed=server
    c1 =eth<i-1>= r<i> =eth<i-1>= s1      multihomed=both

Path i uses 198.18.i.0/24 (client side) and 198.19.i.0/24 (server side), and 2001:db8:1:i::/64,
2001:db8:2:i::/64 in IPv6. Parameters: n=1..8, multihomed=client|server|both,
family=ipv4|ipv6|dual, and shaping of the path links: bw= (Mbit/s), delay= and jitter= (ms, or
'10ms', '500us'), loss= (percent), max_queue_size= (packets).

    mn --custom topologies/n_path.py --topo n_path,n=4 --controller none
"""

import inspect
import sys
from pathlib import Path

# `mn --custom` exec()s this file without __file__; the code object still knows its path.
sys.path.insert(0, str(Path(inspect.currentframe().f_code.co_filename).resolve().parents[1]))
import conformance.mn_bootstrap  # noqa: F401  (our dependencies under the system mn)
from conformance.errors import TopologyError
from conformance.net.topo import PathTopo


class NPath(PathTopo):
    def build(self, n=2, multihomed="client", **shape):
        if not isinstance(n, int) or not 1 <= n <= 8:
            raise TopologyError(f"n_path: n={n!r}: expected an integer from 1 to 8")
        super().build(paths=n, multihomed=multihomed, **shape)


topos = {"n_path": NPath}
