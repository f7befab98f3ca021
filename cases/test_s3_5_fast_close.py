"""RFC 8684 §3.5: MP_FASTCLOSE between two implementations under test.

The client's application closes abortively (SO_LINGER 0) in the middle of a download, with two
subflows up: its stack ends the whole connection at once with MP_FASTCLOSE, carrying the key the
server sent in its MP_CAPABLE (the option's receiver's key). Whether it sends the option on an ACK
(the RFC's option A) or on a RST on every subflow (option B), the server must let go of the
connection on every subflow, and its application sees the connection reset."""

from __future__ import annotations

import pytest

from conformance.lab import MB
from conformance.observe.wire import describe, handshakes, initial_subflow

GRACE = 0.02  # seconds


@pytest.mark.families("ipv4")
@pytest.mark.rfc8684("R3.5-L02")
def test_fast_close_ends_the_connection_on_every_subflow(lab):
    lab.two_subflows()
    run = lab.transfer(up=MB, down=8 * MB, wait_subflows=2, abort_after=2 * MB)
    e = lab.expect
    first = initial_subflow(run.segments("c1-eth0"), "c1-eth0")
    client, server = first.syn.src, first.syn.dst
    server_key = first.synack.mptcp("MP_CAPABLE")[0].get("sender_key")
    joins = [h for h in handshakes(run.segments("c1-eth1")) if h.syn.mptcp("MP_JOIN")]
    e.that(bool(joins), "the client joined a second subflow before closing", expected="an MP_JOIN on c1-eth1",
           seen=f"{len(joins)} joins")
    subflows = [("c1-eth0", first), *(("c1-eth1", h) for h in joins)]
    closes = sorted((s for _, h in subflows for s in h.stream if s.src != server and s.mptcp("MP_FASTCLOSE")),
                    key=lambda s: s.time)
    e.that(bool(closes), "the client's stack ends the connection with MP_FASTCLOSE", expected="MP_FASTCLOSE",
           seen=f"{len(closes)} segments with MP_FASTCLOSE from {client}")
    if not closes:
        return
    keys = {o.get("receiver_key") for s in closes for o in s.mptcp("MP_FASTCLOSE")}
    e.that(keys == {server_key}, "every MP_FASTCLOSE carries the server's key", expected=f"{server_key:#x}",
           seen=", ".join(f"{k:#x}" for k in keys if k is not None) or "no key")
    # Judged where the server is: what it sent after the first MP_FASTCLOSE reached it (its data
    # already in flight then still reaches the client afterwards, and proves nothing).
    at_server = run.segments("s1-eth0")
    arrived = next((s for s in at_server if s.dst == server and s.mptcp("MP_FASTCLOSE")), None)
    e.that(arrived is not None, "the MP_FASTCLOSE reaches the server", expected="MP_FASTCLOSE on s1-eth0",
           seen=describe(arrived))
    if arrived is None:
        return
    # On a RST (option B, what Linux sends) or on an ACK (option A, R3.5-L01), the server must
    # let go of every subflow.
    rid = "R3.5-L02" if arrived.has("R") else "R3.5-L01"
    flows: dict[tuple[str, int], list] = {}
    for seg in at_server:
        if seg.time >= arrived.time:
            peer = (seg.dst, seg.dport) if seg.src == server else (seg.src, seg.sport)
            flows.setdefault(peer, []).append(seg)
    for (addr, port), segs in sorted(flows.items()):
        # The capture is on the wire, not in the server's stack: what it sends in the first
        # GRACE seconds may have been queued before it read the MP_FASTCLOSE (a guest kernel under
        # emulation reads its packets milliseconds late). Anything later (data, a FIN, a
        # retransmission, data moved to another subflow) is a connection still alive.
        data = [s for s in segs if s.src == server and (s.payload or s.has("F")) and s.time > arrived.time + GRACE]
        reset = next((s for s in segs if s.has("R")), None)
        e.that(reset is not None and not data, f"the subflow to {addr}:{port} is reset and the server sends "
               f"nothing more on it ({GRACE * 1000:g} ms after the MP_FASTCLOSE reached its interface)",
               expected="a RST, no data or FIN from the server", rid=rid,
               seen=describe(data[0]) if data else describe(reset) if reset else "no RST after the MP_FASTCLOSE")
    error = str(run.server.get("receive_error") or run.server.get("send_error") or run.server.get("error") or "")
    e.that("reset" in error.lower() or "broken pipe" in error.lower(),
           "the server's application sees the connection reset", expected="ECONNRESET (or EPIPE) on the socket",
           seen=error or {k: run.server.get(k) for k in ("bytes_received", "bytes_sent", "ok")})
    e.counter(run.counters, "s1", "MPFastcloseRx", range(1, 3))
