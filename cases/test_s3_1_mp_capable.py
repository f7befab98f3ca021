"""RFC 8684 §3.1 Connection Initiation: the MP_CAPABLE handshake between two Linux kernels."""

import pytest

from conformance.lab import MB
from conformance.observe.wire import describe, only_handshake
from conformance.wire.crypto import token

pytestmark = pytest.mark.topology("two_path")

FALLBACK_COUNTERS = ("MPCapableFallbackACK", "MPCapableFallbackSYNACK", "MPCapableDataFallback",
                     "DssFallback")


def _mpc(seg):
    opts = seg.mptcp("MP_CAPABLE")
    return opts[0] if len(opts) == 1 else None


@pytest.mark.rfc8684("R3.1-01", "R3.1-11", "R3.1-15", "R3.1-18", "R3.1-19", "R3.1-21", "R3.1-L01")
def test_mp_capable_v1_handshake(lab):
    """MP_CAPABLE v1 handshake (4/12/20 bytes, keys, flags) and 10 MB each way over the connection."""
    run = lab.transfer(up=10 * MB, down=10 * MB)
    hs = only_handshake(run.segments("c1-eth0"), "c1-eth0")
    e = lab.expect

    syn, synack, ack = _mpc(hs.syn), _mpc(hs.synack), _mpc(hs.ack)
    e.that(syn is not None and syn.length == 4 and syn.get("sender_key") is None,
           "SYN carries MP_CAPABLE of length 4 without a key", expected="one MP_CAPABLE, length 4, no key",
           seen=describe(hs.syn), rid="R3.1-11")
    e.that(synack is not None and synack.length == 12 and synack.get("sender_key") is not None,
           "SYN/ACK carries MP_CAPABLE of length 12 with the listener's key",
           expected="one MP_CAPABLE, length 12, sender key", seen=describe(hs.synack), rid="R3.1-11")
    e.that(ack is not None and ack.length == 20 and ack.get("sender_key") is not None
           and synack is not None and ack.get("receiver_key") == synack.get("sender_key"),
           "third ACK carries MP_CAPABLE of length 20 with both keys (the listener's echoed)",
           expected="length 20, sender key, receiver key == SYN/ACK key", seen=describe(hs.ack), rid="R3.1-11")
    for what, opt, seg in (("SYN", syn, hs.syn), ("SYN/ACK", synack, hs.synack), ("third ACK", ack, hs.ack)):
        if opt is None:
            continue
        e.equal(opt.get("version"), 1, f"{what} MP_CAPABLE version (highest supported: v1)", seen=seg,
                rid="R3.1-01")
        flags = opt.get("flags", 0)
        e.equal(flags & 0x40, 0, f"{what} MP_CAPABLE flag B (extensibility) is 0", seen=seg, rid="R3.1-15")
        e.equal(flags & 0x3F, 0x01, f"{what} MP_CAPABLE crypto flags: H=1, D..G=0", seen=seg, rid="R3.1-18")
        e.that(flags & 0x1F != 0, f"{what} MP_CAPABLE selects a crypto algorithm", expected="a flag of D..H",
               seen=seg, rid="R3.1-19")

    first = hs.first_data(from_client=True)
    fopt = _mpc(first) if first else None
    if fopt is not None:
        e.that(fopt.length in (22, 24) and fopt.get("data_level_length") is not None
               and ack is not None and fopt.get("sender_key") == ack.get("sender_key")
               and fopt.get("receiver_key") == ack.get("receiver_key"),
               "client's first data segment repeats MP_CAPABLE with both keys and a data-level length",
               expected="MP_CAPABLE length 22/24, both keys, data-level length", seen=describe(first),
               rid="R3.1-L01")
    else:
        e.that(first is not None and bool(first.mptcp("DSS")),
               "client's first data segment carries a mapping (MP_CAPABLE with data, or DSS once the "
               "listener's DSS has arrived)", expected="MP_CAPABLE 22/24 or DSS", seen=describe(first),
               rid="R3.1-L01")

    if synack is not None and ack is not None:
        server_key, client_key = synack.get("sender_key"), ack.get("sender_key")
        for role, key, report in (("server", server_key, run.server), ("client", client_key, run.client)):
            info = report.get("mptcp_info") or report.get("mptcp_info_mid") or {}
            e.equal(info.get("token"), f"{token(key):08x}",
                    f"{role} kernel token (MPTCP_INFO) is the top 32 bits of SHA-256 of its key on the wire",
                    rid="R3.1-21")
        e.equal(run.tshark_token("c1-eth0", hs.synack.frame), f"{token(server_key):08x}",
                "tshark's token of the listener key agrees with ours", rid="R3.1-21")

    run.expect_intact(e)
    for role, report in (("client", run.client), ("server", run.server)):
        e.equal(report.get("fallback"), False, f"{role} socket is still MPTCP after the transfer")
    for node, names in (("c1", ("MPCapableSYNTX", "MPCapableSYNACKRX")), ("s1", ("MPCapableSYNRX",
                                                                                "MPCapableACKRX"))):
        for name in names:
            e.counter(run.counters, node, name, 1)
        for name in FALLBACK_COUNTERS:
            e.counter(run.counters, node, name, 0)
