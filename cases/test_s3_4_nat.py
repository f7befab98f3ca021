"""RFC 8684 §3.4.1 through a NAT: the client behind a source NAT on path 1 announces its other
address with ADD_ADDR.

The `snat` middlebox on r1 rewrites the client's address to the router's and its port into
20000-20999, so the server knows the connection by the NAT's address and port only. The client
announces its second address; the server, accepting announcements, opens a join to that address
on the port of the subflow the ADD_ADDR arrived on, which is the NAT's port, not the client's:
the client has nothing there and refuses the join. The server must then leave that address
alone for the rest of the connection, which carries on through the NAT unharmed."""

from __future__ import annotations

import pytest

from conformance.endpoints.linux import EndpointFlags, MptcpConfig, PMEndpoint
from conformance.errors import CapabilityMissing
from conformance.lab import MB
from conformance.observe.segments import decode
from conformance.observe.wire import describe, initial_subflow

pytestmark = pytest.mark.topology("two_path")


@pytest.mark.families("ipv4")
@pytest.mark.rfc8684("R3.4.1-08", "R3.4.1-13")
def test_add_addr_from_behind_a_nat_is_tried_once_on_the_nat_port(lab):
    """The server joins the announced address once, on the port it sees the connection on (the
    NAT's); the client refuses it with RST; the server does not try that address again."""
    try:
        box = lab.middlebox("snat", router="r1")
    except CapabilityMissing as exc:
        pytest.skip(f"this machine cannot run the case: {exc}")
    second = lab.addresses("c1")[1]
    lab.configure("c1", MptcpConfig(subflows=2, endpoints=[PMEndpoint(second, EndpointFlags.SIGNAL, dev="c1-eth1",
                                                                      id=5)]))
    lab.configure("s1", MptcpConfig(subflows=2, add_addr_accepted=2))
    run = lab.transfer(up=2 * MB, down=2 * MB)
    e = lab.expect
    box.expect_acted(e)
    client_view = initial_subflow(run.segments("c1-eth0"), "c1-eth0")
    server_view = initial_subflow(run.segments("s1-eth0"), "s1-eth0")
    e.that(server_view.syn.src != client_view.syn.src and server_view.syn.sport != client_view.syn.sport,
           "the server sees the connection from the NAT's address and port", expected="translated",
           seen=f"client {client_view.syn.src}.{client_view.syn.sport}, server sees "
                f"{server_view.syn.src}.{server_view.syn.sport}")
    announced = next((s for s in server_view.stream if s.src == server_view.syn.src
                      and any(not o.get("echo") and o.get("address") == second for o in s.mptcp("ADD_ADDR"))),
                     None)
    e.that(announced is not None, "the client's ADD_ADDR of its other address crosses the NAT",
           expected=f"ADD_ADDR {second}", seen=describe(announced))
    # Joins leave from new ports: look at every segment of the server's captures, not only the
    # transfer's port.
    at_server = decode(run.pcaps["s1-eth0"])
    syns = [s for s in at_server if s.has("S") and not s.has("A") and s.dst == second and s.mptcp("MP_JOIN")]
    first = syns[0] if syns else None
    e.that(first is not None and first.dport == server_view.syn.sport,
           "the server joins the announced address on the port of the subflow the ADD_ADDR came on",
           expected=f"MP_JOIN SYN to {second}.{server_view.syn.sport} (the NAT's port)", seen=describe(first),
           rid="R3.4.1-08")
    if first is None:
        return
    refused = next((s for s in at_server if s.has("R") and s.src == second and s.sport == first.dport
                    and s.dport == first.sport), None)
    e.that(refused is not None, "the client, which has nothing on that port, refuses the join with RST",
           expected="RST", seen=describe(refused))
    attempts = {(s.sport, o.get("sender_random")) for s in syns for o in s.mptcp("MP_JOIN")}
    e.that(len(attempts) == 1, "after the refused join the server does not try that address again",
           expected="one attempt (its own SYN retransmissions aside)",
           seen=f"{len(attempts)} attempts: " + "; ".join(describe(s) for s in syns[:3]), rid="R3.4.1-13")
    e.counter(run.counters, "s1", "MPJoinSynTx", 1)
    run.expect_stays_mptcp(e)
    run.expect_intact(e)
