"""RFC 8684 §3.1/§3.7: an MPTCP host meeting a plain TCP peer runs the connection as plain TCP."""

import pytest

from conformance.lab import MB
from conformance.observe.wire import describe, only_handshake

pytestmark = pytest.mark.topology("two_path")


def _with_mptcp(segments):
    return [s for s in segments if s.options]


@pytest.mark.rfc8684("R3.1-29")
def test_mptcp_client_to_tcp_server_falls_back(lab):
    """An MPTCP client whose SYN/ACK comes back without MP_CAPABLE continues as plain TCP."""
    run = lab.transfer(up=MB, down=MB, mptcp_server=False)
    segs = run.segments("c1-eth0")
    hs = only_handshake(segs, "c1-eth0")
    e = lab.expect
    e.that(len(hs.syn.mptcp("MP_CAPABLE")) == 1, "client SYN offers MP_CAPABLE",
           expected="MP_CAPABLE in SYN", seen=describe(hs.syn))
    e.that(not hs.synack.options, "plain TCP server's SYN/ACK has no MPTCP option",
           expected="no MPTCP option", seen=describe(hs.synack))
    after = [s for s in _with_mptcp(segs) if s.frame > hs.synack.frame]
    e.that(not after, "after the MP_CAPABLE-less SYN/ACK no segment carries an MPTCP option",
           expected="none", seen=describe(after[0]) if after else "none", rid="R3.1-29")
    # TCP_IS_MPTCP is None on a kernel without the option (Debian's 6.1): MPTCP_INFO then says it alone.
    e.that(run.client.get("fallback") is True and run.client.get("mptcp") in (False, None),
           "client socket reports fallback (MPTCP_INFO unavailable, TCP_IS_MPTCP=0 where the kernel has it)",
           expected="fallback", seen={k: run.client.get(k) for k in ("fallback", "mptcp")}, rid="R3.1-29")
    e.counter(run.counters, "c1", "MPCapableSYNTX", 1)
    e.counter(run.counters, "c1", "MPCapableFallbackSYNACK", 1, rid="R3.1-29")
    run.expect_intact(e)


@pytest.mark.rfc8684("R3.1-30")
def test_tcp_client_to_mptcp_server_stays_tcp(lab):
    """An MPTCP listener answers a SYN without MP_CAPABLE as plain TCP."""
    run = lab.transfer(up=MB, down=MB, mptcp_client=False)
    segs = run.segments("c1-eth0")
    hs = only_handshake(segs, "c1-eth0")
    e = lab.expect
    e.that(not hs.syn.options, "plain TCP client's SYN has no MPTCP option", expected="none",
           seen=describe(hs.syn))
    e.that(not hs.synack.mptcp("MP_CAPABLE"), "listener's SYN/ACK carries no MP_CAPABLE",
           expected="no MP_CAPABLE", seen=describe(hs.synack), rid="R3.1-30")
    rest = _with_mptcp(segs)
    e.that(not rest, "no segment of the connection carries an MPTCP option", expected="none",
           seen=describe(rest[0]) if rest else "none", rid="R3.1-30")
    e.that(run.server.get("fallback") is True, "accepted socket reports fallback (no MPTCP_INFO)",
           expected="fallback", seen={k: run.server.get(k) for k in ("fallback", "mptcp")})
    e.counter(run.counters, "s1", "MPCapableSYNRX", 0, rid="R3.1-30")
    run.expect_intact(e)
