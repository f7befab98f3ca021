"""RFC 8684 §3.4.1 Address Advertisement: the server announces its second address (ADD_ADDR), the
client echoes it and joins to it."""

import ipaddress

import pytest

from conformance.endpoints.linux import EndpointFlags, MptcpConfig, PMEndpoint
from conformance.lab import MB
from conformance.observe.wire import describe, initial_subflow, joins
from conformance.wire.crypto import add_addr_hmac

pytestmark = pytest.mark.topology("two_path_server")


@pytest.mark.rfc8684("R3.4.1-08", "R3.4.1-10", "R3.4.1-L01", "R3.4.1-L02")
def test_add_addr_echo_and_join(lab):
    """Server signals its second address; the client echoes the ADD_ADDR and joins that address."""
    announced = lab.addresses("s1")[1]
    lab.configure("s1", MptcpConfig(subflows=2, endpoints=[PMEndpoint(announced, EndpointFlags.SIGNAL,
                                                                      dev="s1-eth1")]))
    lab.configure("c1", MptcpConfig(subflows=2, add_addr_accepted=2))
    run = lab.transfer(up=5 * MB, down=5 * MB, wait_subflows=2)
    e = lab.expect
    segs = run.segments("c1-eth0")
    mpc = initial_subflow(segs, "c1-eth0")
    server, client = mpc.synack.src, mpc.syn.src
    server_key = mpc.synack.mptcp("MP_CAPABLE")[0].get("sender_key")
    client_key = mpc.ack.mptcp("MP_CAPABLE")[0].get("sender_key")

    def add_addrs(src, echo):
        return [(s, o) for s in segs if s.src == src for o in s.mptcp("ADD_ADDR") if o.get("echo") == echo]

    sent, echoed = add_addrs(server, 0), add_addrs(client, 1)
    e.that(bool(sent), "server sends ADD_ADDR for its second address", expected="an ADD_ADDR (E=0)",
           seen=f"{len(sent)} ADD_ADDR")
    e.that(bool(echoed), "client echoes the ADD_ADDR", expected="an ADD_ADDR with E=1",
           seen=f"{len(echoed)} echoes", rid="R3.4.1-L01")
    if not sent:
        return
    seg, opt = sent[0]
    addr = ipaddress.ip_address(announced)
    e.equal(opt.get("address"), addr.compressed, "ADD_ADDR carries the announced address", seen=seg)
    e.equal(opt.length, 16 if addr.version == 4 else 28, "ADD_ADDR length (no port, with HMAC)", seen=seg)
    e.equal(opt.get("reserved"), 0, "ADD_ADDR unassigned flag bits are 0", seen=seg, rid="R3.4.1-10")
    wanted = add_addr_hmac(server_key, client_key, opt.get("address_id"), addr.packed, None)
    e.equal(opt.get("truncated_hmac"), wanted,
            "ADD_ADDR HMAC = rightmost 64 bits of HMAC(Key-A‖Key-B, ID‖address‖zero port)", seen=seg,
            rid="R3.4.1-L02")
    if echoed:
        eseg, eopt = echoed[0]
        e.that(eopt.get("address") == addr.compressed and eopt.get("address_id") == opt.get("address_id")
               and eopt.get("truncated_hmac") is None and eopt.length == (8 if addr.version == 4 else 20),
               "the echo repeats ID and address, with E=1 and without HMAC",
               expected=f"ADD_ADDR E=1 id {opt.get('address_id')} {addr} length {8 if addr.version == 4 else 20}",
               seen=describe(eseg), rid="R3.4.1-L01")

    joined = joins(run.segments("s1-eth1"))
    e.that(bool(joined), "client joins the announced address", expected="an MP_JOIN handshake on s1-eth1",
           seen=describe(joined[0].syn) if joined else "none")
    if joined:
        e.equal((joined[0].syn.dst, joined[0].syn.dport), (str(addr), mpc.syn.dport),
                "a port-less ADD_ADDR is joined at the port of the subflow it came on", seen=joined[0].syn,
                rid="R3.4.1-08")
    run.expect_intact(e)
    e.counter(run.counters, "s1", "AddAddrTx", 1)
    e.counter(run.counters, "c1", "AddAddr", 1)
    e.counter(run.counters, "c1", "EchoAddTx", 1)
    e.counter(run.counters, "s1", "EchoAdd", 1)
    e.counter(run.counters, "s1", "MPJoinSynRx", 1)
