"""RFC 8684 §3.2 Starting a New Subflow: MP_JOIN over the second path between two kernels."""

import pytest

from conformance.lab import MB
from conformance.observe.wire import describe, only_handshake
from conformance.wire.crypto import join_hmac, join_synack_hmac, token

pytestmark = pytest.mark.topology("two_path")


@pytest.mark.rfc8684("R3.2-02", "R3.2-03", "R3.2-04", "R3.2-06", "R3.2-13", "R3.1-21")
def test_join_second_path(lab):
    """The client joins a second subflow over its second interface; both subflows carry data."""
    lab.two_subflows()
    run = lab.transfer(up=10 * MB, down=10 * MB, wait_subflows=2)
    e = lab.expect
    mpc = only_handshake(run.segments("c1-eth0"), "c1-eth0")
    join = only_handshake(run.segments("c1-eth1"), "c1-eth1")
    server_key = mpc.synack.mptcp("MP_CAPABLE")[0].get("sender_key")
    client_key = mpc.ack.mptcp("MP_CAPABLE")[0].get("sender_key")

    syn, synack, ack = (s.mptcp("MP_JOIN") for s in (join.syn, join.synack, join.ack))
    e.that(len(syn) == 1 and syn[0].length == 12, "join SYN carries MP_JOIN of length 12",
           expected="one MP_JOIN, length 12", seen=describe(join.syn))
    e.that(len(synack) == 1 and synack[0].length == 16, "join SYN/ACK carries MP_JOIN of length 16",
           expected="one MP_JOIN, length 16", seen=describe(join.synack), rid="R3.2-03")
    e.that(len(ack) == 1 and ack[0].length == 24, "join third ACK carries MP_JOIN of length 24",
           expected="one MP_JOIN, length 24", seen=describe(join.ack))
    if not (syn and synack and ack):
        return
    syn, synack, ack = syn[0], synack[0], ack[0]
    tok = f"{syn.get('receiver_token', 0):08x}"
    e.equal(tok, f"{token(server_key):08x}", "join SYN token is the server's token (SHA-256 of its key)",
            seen=join.syn, rid="R3.2-13")
    e.equal(tok, run.tshark_token("c1-eth0", mpc.synack.frame),
            "join SYN token equals tshark's token of the server key", seen=join.syn, rid="R3.1-21")
    for what, opt, seg in (("SYN", syn, join.syn), ("SYN/ACK", synack, join.synack)):
        e.equal(opt.get("reserved"), 0, f"join {what} reserved bits are 0", seen=seg, rid="R3.2-02")
    e.equal(ack.get("reserved"), 0, "join third ACK reserved bits are 0", seen=join.ack, rid="R3.2-06")
    r_a, r_b = syn.get("sender_random"), synack.get("sender_random")
    e.equal(synack.get("sender_truncated_hmac"), join_synack_hmac(server_key, client_key, r_b, r_a),
            "SYN/ACK truncated HMAC = leftmost 64 bits of HMAC(Key-B‖Key-A, R-B‖R-A)", seen=join.synack,
            rid="R3.2-03")
    e.equal(ack.get("sender_hmac"), join_hmac(client_key, server_key, r_a, r_b)[:20],
            "third ACK HMAC = HMAC(Key-A‖Key-B, R-A‖R-B)", seen=join.ack)
    reply = next((s for s in join.stream if s.src == join.syn.dst and s.frame > join.ack.frame), None)
    e.that(reply is not None and not reply.mptcp("MP_JOIN"),
           "the joined host answers the third ACK with an ACK that carries no MP_JOIN",
           expected="ACK without MP_JOIN", seen=describe(reply), rid="R3.2-04")

    total = run.payload_bytes("c1-eth0") + run.payload_bytes("c1-eth1")
    for intf in ("c1-eth0", "c1-eth1"):
        share = run.payload_bytes(intf) / total if total else 0
        e.that(share >= 0.05, f"subflow on {intf} carries data", expected=">= 5% of the payload",
               seen=f"{run.payload_bytes(intf)} of {total} payload bytes")
    run.expect_intact(e)
    e.counter(run.counters, "s1", "MPJoinSynRx", 1)
    e.counter(run.counters, "c1", "MPJoinSynAckRx", 1)
    e.counter(run.counters, "s1", "MPJoinAckRx", 1)
    for node, name in (("c1", "MPJoinSynAckHMacFailure"), ("s1", "MPJoinAckHMacFailure"),
                       ("s1", "MPJoinRejected")):
        e.counter(run.counters, node, name, 0)
