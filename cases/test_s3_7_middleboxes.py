"""RFC 8684 §3.7 and §6: kernel against kernel through middleboxes on the routers (conformance.middlebox).

Each case attaches a profile to one path's router, runs a transfer, and judges both ends from
both sides of the middlebox: what a host sent (the capture before the middlebox) and what it
received (the capture after it). The middlebox's own counters prove it acted."""

import pytest

from conformance.errors import CapabilityMissing, NotExercised
from conformance.lab import MB, RERUNS
from conformance.middlebox import ClampMss, Middlebox, profile
from conformance.observe.wire import describe, handshakes, initial_subflow, only_handshake

pytestmark = pytest.mark.topology("two_path")

MIDDLEBOX_RESET = 0x06  # MP_TCPRST reason "Middlebox interference" (§3.6)
CLAMPED_MSS = 1200  # the clamp-mss profile's, and so the isp bundle's

def _attach(lab, prof, **where) -> Middlebox:
    try:
        return lab.middlebox(prof, **where)
    except CapabilityMissing as exc:
        pytest.skip(f"this machine cannot run the case: {exc}")


def _handshakes(run):
    """The first subflow's handshake at the client (c1-eth0) and at the server (s1-eth0)."""
    return (only_handshake(run.segments("c1-eth0"), "c1-eth0"), only_handshake(run.segments("s1-eth0"), "s1-eth0"))


def _no_options_after(e, segments, src, after_frame, what: str, rid: str) -> None:
    """`src` sends no MPTCP option in `segments` after frame `after_frame`."""
    later = [s for s in segments if s.src == src and s.frame > after_frame and s.options]
    e.that(not later, what, expected="none", seen=describe(later[0]) if later else "none", rid=rid)


def _fallback_reports(e, run, rid, deviation=None):
    for role, report in (("client", run.client), ("server", run.server)):
        e.that(report.get("fallback") is True, f"the {role}'s socket runs as plain TCP (no MPTCP_INFO)",
               expected="fallback", seen={k: report.get(k) for k in ("fallback", "mptcp", "error")
                                          if report.get(k) is not None}, rid=rid, deviation=deviation)


@pytest.mark.families("ipv4", "ipv6")
@pytest.mark.rfc8684("R3.7-01", "R3.1-29", "R3.1-30")
def test_syn_stripped_falls_back_to_tcp(lab):
    """A middlebox strips MP_CAPABLE from the client's SYN: the listener answers as plain TCP and
    the client continues as plain TCP."""
    box = _attach(lab, "strip-mptcp-syn", router="r1")
    run = lab.transfer(up=MB, down=MB)
    e = lab.expect
    sent, seen = _handshakes(run)
    offered = [s for s in sent.stream if s.has("S") and not s.has("A") and s.mptcp("MP_CAPABLE")]
    e.that(bool(offered), "the client's SYN offers MP_CAPABLE", expected="MP_CAPABLE", seen=describe(sent.syn))
    e.that(not seen.syn.options, "the SYN reaches the listener without MPTCP options", expected="none",
           seen=describe(seen.syn))
    box.expect_acted(e, at_least=len(offered), at_most=len(offered))
    e.that(not seen.synack.mptcp("MP_CAPABLE"), "the listener's SYN/ACK carries no MP_CAPABLE",
           expected="no MP_CAPABLE", seen=describe(seen.synack), rid="R3.1-30")
    _no_options_after(e, sent.stream, sent.syn.src, sent.synack.frame,
                      "the client sends no MPTCP option after the MP_CAPABLE-less SYN/ACK", "R3.1-29")
    _no_options_after(e, seen.stream, seen.syn.dst, seen.syn.frame,
                      "the listener sends no MPTCP option on the connection", "R3.7-01")
    _fallback_reports(e, run, "R3.7-01")
    e.counter(run.counters, "c1", "MPCapableFallbackSYNACK", 1, rid="R3.1-29")
    e.counter(run.counters, "s1", "MPCapableSYNRX", 0, rid="R3.1-30")
    run.expect_intact(e)


@pytest.mark.families("ipv4")
@pytest.mark.rfc8684("R3.7-01", "R3.1-29", "R3.1-31")
def test_synack_stripped_falls_back_to_tcp(lab):
    """A middlebox strips MP_CAPABLE from the listener's SYN/ACK: the client falls back, and the
    listener, whose third ACK then lacks MP_CAPABLE, falls back too."""
    box = _attach(lab, "strip-mptcp-synack", router="r1")
    run = lab.transfer(up=MB, down=MB)
    e = lab.expect
    got, sent = _handshakes(run)
    offered = [s for s in sent.stream if s.has("S") and s.has("A") and s.mptcp("MP_CAPABLE")]
    e.that(bool(offered), "the listener's SYN/ACK carries MP_CAPABLE", expected="MP_CAPABLE",
           seen=describe(sent.synack))
    e.that(not got.synack.options, "the SYN/ACK reaches the client without MPTCP options", expected="none",
           seen=describe(got.synack))
    box.expect_acted(e, at_least=len(offered), at_most=len(offered))
    _no_options_after(e, got.stream, got.syn.src, got.synack.frame,
                      "the client sends no MPTCP option after the MP_CAPABLE-less SYN/ACK", "R3.1-29")
    e.that(not sent.ack.mptcp("MP_CAPABLE"), "the third ACK reaches the listener without MP_CAPABLE",
           expected="no MP_CAPABLE", seen=describe(sent.ack))
    _no_options_after(e, sent.stream, sent.syn.dst, sent.ack.frame,
                      "the listener sends no MPTCP option after a third ACK without MP_CAPABLE", "R3.1-31")
    _fallback_reports(e, run, "R3.7-01")
    e.counter(run.counters, "c1", "MPCapableFallbackSYNACK", 1, rid="R3.1-29")
    e.counter(run.counters, "s1", "MPCapableFallbackACK", 1, rid="R3.1-31")
    run.expect_intact(e)


@pytest.mark.families("ipv4")
@pytest.mark.rfc8684("R3.1-31", "R3.1-33")
def test_third_ack_stripped_listener_falls_back(lab):
    """A middlebox strips MP_CAPABLE from the third ACK only: the listener falls back to plain TCP
    (and the client follows once its data is ACKed without a Data ACK)."""
    box = _attach(lab, "strip-mptcp-third-ack", router="r1")
    run = lab.transfer(up=MB, down=MB)
    e = lab.expect
    sent, got = _handshakes(run)
    e.that(len(sent.ack.mptcp("MP_CAPABLE")) == 1, "the client's third ACK echoes both keys in MP_CAPABLE",
           expected="MP_CAPABLE", seen=describe(sent.ack))
    e.that(not got.ack.options, "the third ACK reaches the listener without MPTCP options", expected="none",
           seen=describe(got.ack))
    box.expect_acted(e, at_least=1, at_most=1)
    _no_options_after(e, got.stream, got.syn.dst, got.ack.frame,
                      "the listener sends no MPTCP option after a third ACK without MP_CAPABLE", "R3.1-31")
    e.that(run.server.get("fallback") is True, "the listener's socket runs as plain TCP", expected="fallback",
           seen={k: run.server.get(k) for k in ("fallback", "mptcp")}, rid="R3.1-33")
    e.counter(run.counters, "s1", "MPCapableFallbackACK", 1, rid="R3.1-31")
    e.that(run.client.get("fallback") is True, "the client's socket follows into plain TCP", expected="fallback",
           seen={k: run.client.get(k) for k in ("fallback", "mptcp")})
    e.counter(run.counters, "c1", "MPCapableDataFallback", 1)
    run.expect_intact(e)


@pytest.mark.families("ipv4", "ipv6")
@pytest.mark.rfc8684("R3.7-05")
def test_data_options_stripped_falls_back(lab):
    """A middlebox strips MPTCP options from every data segment, both ways, after an intact
    handshake. The client sends first (the server holds its data back), so its data is ACKed
    without a Data ACK: on this lone first subflow it must drop to plain TCP, after one final
    infinite mapping (§3.7)."""
    box = _attach(lab, "strip-mptcp-data", router="r1")
    run = lab.transfer(up=MB, down=MB, server_send_delay=0.5)
    e = lab.expect
    sent, got = _handshakes(run)
    client = sent.syn.src
    e.that(len(got.ack.mptcp("MP_CAPABLE")) == 1, "the third ACK (no data) reaches the listener with MP_CAPABLE",
           expected="MP_CAPABLE", seen=describe(got.ack))
    first = got.first_data(from_client=True)
    e.that(first is not None and not first.options, "the client's first data reaches the listener without "
           "MPTCP options", expected="none", seen=describe(first))
    box.expect_acted(e)
    data = [s for s in sent.stream if s.src == client and s.payload]
    peer_data = next((s for s in sent.stream if s.src != client and s.payload), None)
    bare_ack = next((s for s in sent.stream if data and s.src != client and s.has("A") and not s.has("S")
                     and s.ack != data[0].seq and not s.mptcp("DSS")), None)
    e.that(bool(data) and data[0].options and bare_ack is not None
           and (peer_data is None or bare_ack.frame < peer_data.frame),
           "the client's mapped data is ACKed without a Data ACK before any data reaches it",
           expected="an ACK without DSS", seen=f"{describe(data[0] if data else None)}; then {describe(bare_ack)}")
    plain = next((s for s in data if not s.options), None)
    e.that(plain is not None and bare_ack is not None and plain.frame > bare_ack.frame,
           "the client then drops to plain TCP: it sends data without MPTCP options",
           expected="option-less data", seen=describe(plain), rid="R3.7-05")
    if plain is not None:
        _no_options_after(e, sent.stream, client, plain.frame,
                          "once it sent plain data, the client sends no MPTCP option again", "R3.7-05")
    infinite = [s for s in sent.stream if s.src == client
                and any(o.get("data_level_length") == 0 for o in s.mptcp("DSS"))]
    last = next((s for s in reversed(data) if s.options), None)
    e.that(bool(infinite), "before dropping to TCP the client sends one infinite mapping (DSS, data-level "
           "length 0)", expected="a DSS mapping of length 0",
           seen=describe(infinite[0]) if infinite else f"none; its last mapping: {describe(last)}",
           rid="R3.7-05", deviation=lab.known_deviation("R3.7-05"))
    _fallback_reports(e, run, None)
    e.counter(run.counters, "c1", "MPCapableDataFallback", 1)
    e.counter(run.counters, "s1", "DssFallback", 1)
    run.expect_intact(e)


@pytest.mark.families("ipv4")
@pytest.mark.rfc8684("R3.7-01")
def test_isp_normalising_syns_and_clamping_mss_falls_back_to_tcp(lab):
    """An access network ("isp" bundle) removes MPTCP options from SYNs and clamps the MSS to
    1200: the connection falls back to plain TCP, and no segment either way exceeds the clamp."""
    try:
        boxes = lab.middleboxes("isp", router="r1")
    except CapabilityMissing as exc:
        pytest.skip(f"this machine cannot run the case: {exc}")
    run = lab.transfer(up=MB, down=MB)
    e = lab.expect
    sent, seen = _handshakes(run)
    for box in boxes:
        box.expect_acted(e)
    e.that(bool(sent.syn.mptcp("MP_CAPABLE")) and not seen.syn.options, "the client's MP_CAPABLE SYN reaches "
           "the listener without MPTCP options", expected="MP_CAPABLE sent, none received",
           seen=f"{describe(sent.syn)}; {describe(seen.syn)}")
    largest = max((s for s in run.segments("s1-eth0") if s.payload), key=lambda s: s.payload, default=None)
    e.that(largest is not None and largest.payload <= CLAMPED_MSS, "no data segment exceeds the clamped MSS",
           expected=f"at most {CLAMPED_MSS} bytes", seen=describe(largest))
    _no_options_after(e, seen.stream, seen.syn.dst, seen.syn.frame,
                      "the listener sends no MPTCP option on the connection", "R3.7-01")
    _fallback_reports(e, run, "R3.7-01")
    run.expect_intact(e)


@pytest.mark.families("ipv4")
@pytest.mark.rfc8684("R6-01", "R3.9.3-01", "R3.1-32")
def test_mptcp_syn_blackholed_retries_plain_tcp(lab):
    """A firewall drops SYNs that carry MPTCP options: after its MP_CAPABLE SYNs go unanswered the
    client retries with a plain SYN and the transfer completes as plain TCP."""
    box = _attach(lab, "drop-mptcp-syn", router="r1")
    run = lab.transfer(up=MB, down=MB)
    e = lab.expect
    sent = run.segments("c1-eth0")
    syns = [s for s in sent if s.has("S") and not s.has("A")]
    mpc = [s for s in syns if s.mptcp("MP_CAPABLE")]
    plain = next((s for s in syns if not s.options), None)
    box.expect_acted(e, at_least=max(len(mpc), 1), at_most=max(len(mpc), 1))
    e.that(bool(mpc) and plain is not None and plain.frame > mpc[-1].frame,
           "after its MP_CAPABLE SYNs go unanswered the client sends a SYN without MPTCP options",
           expected="MP_CAPABLE SYN(s), then a plain SYN",
           seen=f"{len(mpc)} MP_CAPABLE SYN(s), then {describe(plain)}", rid="R3.9.3-01",
           deviation=lab.known_deviation("R3.9.3-01"))
    opened = handshakes(run.segments("s1-eth0"))
    # None at all: a client without the blackhole fallback (Linux 6.1) gives up with its MP_CAPABLE SYNs.
    e.that(len(opened) == 1 and not opened[0].syn.options and not opened[0].synack.options,
           "the connection is opened by the plain SYN", expected="one handshake, plain SYN and SYN/ACK",
           seen="; ".join(f"{describe(h.syn)}; {describe(h.synack)}" for h in opened)
           or f"no handshake reached the server; the client's report: {run.client.get('error')}", rid="R6-01",
           deviation=lab.known_deviation("R6-01"))
    e.that(plain is not None, f"the client retried MP_CAPABLE {max(len(mpc) - 1, 0)} time(s) before plain TCP "
           "(informational)", expected="any number", seen=f"{len(mpc)} MP_CAPABLE SYN(s)", rid="R3.1-32",
           deviation=lab.known_deviation("R3.9.3-01"))
    deviation = lab.known_deviation("R6-01")
    _fallback_reports(e, run, "R6-01", deviation)
    e.counter(run.counters, "c1", "MPCapableSYNTXDrop", 1)
    e.counter(run.counters, "c1", "Blackhole", 1)
    run.expect_intact(e, rid="R6-01", deviation=deviation)


def _join(segments, where):
    found = [h for h in handshakes(segments) if h.syn.mptcp("MP_JOIN")]
    if len(found) != 1:
        pytest.fail(f"{where}: expected one MP_JOIN handshake, found {len(found)}")
    return found[0]


@pytest.mark.families("ipv4")
@pytest.mark.rfc8684("R3.2-11", "R3.2-12")
def test_join_synack_stripped_subflow_is_reset(lab):
    """On the second path a middlebox strips MP_JOIN from the SYN/ACK: the client must reset that
    subflow; the connection carries on over the first path."""
    lab.two_subflows()
    box = _attach(lab, "strip-mptcp-synack", router="r2")
    run = lab.transfer(up=MB, down=MB, wait_subflows=2)
    e = lab.expect
    got, sent = _join(run.segments("c1-eth1"), "c1-eth1"), _join(run.segments("s1-eth0"), "s1-eth0")
    e.that(len(sent.synack.mptcp("MP_JOIN")) == 1, "the server's join SYN/ACK carries MP_JOIN", expected="MP_JOIN",
           seen=describe(sent.synack))
    e.that(not got.synack.options, "the join SYN/ACK reaches the client without MPTCP options", expected="none",
           seen=describe(got.synack))
    box.expect_acted(e, at_least=1, at_most=1)
    reply = next((s for s in got.stream if s.src == got.syn.src and s.frame > got.synack.frame), None)
    e.that(reply is not None and reply.has("R"), "the client answers that SYN/ACK with a RST", expected="RST",
           seen=describe(reply), rid="R3.2-11")
    joined = [s for s in got.stream if s.src == got.syn.src and s.mptcp("MP_JOIN") and not s.has("S")]
    e.that(not joined, "the client never completes the join (no third ACK with MP_JOIN)", expected="none",
           seen=describe(joined[0]) if joined else "none", rid="R3.2-12")
    e.counter(run.counters, "c1", "MPJoinSynAckRx", 0, rid="R3.2-12")
    run.expect_stays_mptcp(e, "the connection stays MPTCP on the first path")
    run.expect_intact(e)


@pytest.mark.families("ipv4")
@pytest.mark.rfc8684("R3.7-06", "R3.7-07")
def test_join_losing_options_is_reset(lab):
    """On the second path a middlebox strips every MPTCP option once the join handshake is done:
    the host receiving unmapped data on that subflow resets it with MP_TCPRST "Middlebox
    interference"; the data arrives intact over the first path."""
    lab.two_subflows()
    box = _attach(lab, profile("strip-mptcp-all", from_packet=5), router="r2")
    run = lab.transfer(up=MB, down=MB, wait_subflows=2)
    e = lab.expect
    # Each host's view of the join: what it received (after r2), what it sent (before r2).
    client_side = _join(run.segments("c1-eth1"), "c1-eth1")
    server_side = _join(run.segments("r2-eth1"), "r2-eth1")
    client = client_side.syn.src
    e.that(bool(client_side.ack.mptcp("MP_JOIN")) and bool(server_side.ack.mptcp("MP_JOIN")),
           "the join handshake passes intact", expected="MP_JOIN third ACK", seen=describe(server_side.ack))
    box.expect_acted(e)
    rst = next((s for s in client_side.stream + server_side.stream if s.has("R")), None)
    if rst is None:
        e.that(False, "the subflow that lost its options is reset", expected="a RST", seen="no RST", rid="R3.7-06")
    else:
        by_client = rst.src == client
        at_sender = next(s for s in (client_side if by_client else server_side).stream if s.has("R"))
        received = client_side if by_client else server_side
        unmapped = next((s for s in received.stream if s.src != at_sender.src and s.payload
                         and s.frame < at_sender.frame and not s.mptcp("DSS")), None)
        e.that(unmapped is not None, f"the {'client' if by_client else 'server'} received data without a mapping "
               "on the join before resetting it", expected="unmapped data", seen=describe(unmapped),
               rid="R3.7-06")
        reasons = [o.get("reason") for o in at_sender.mptcp("MP_TCPRST")]
        e.that(reasons == [MIDDLEBOX_RESET], "the reset carries MP_TCPRST reason 0x06 (middlebox interference)",
               expected="MP_TCPRST reason 6", seen=describe(at_sender), rid="R3.7-07",
               deviation=lab.known_deviation("R3.7-07"))
    run.expect_stays_mptcp(e, "the connection stays MPTCP on the first path")
    e.counter(run.counters, "c1", "MPJoinSynAckRx", 1)
    run.expect_intact(e)


def _first_subflow(run):
    """The connection's first subflow at the client and at the server (which also sees the join)."""
    return tuple(initial_subflow(run.segments(intf), intf) for intf in ("c1-eth0", "s1-eth0"))


def _mappings(segments, src):
    """(DSN, SSN, length) -> the data segments from `src` that carry that DSS mapping."""
    out: dict[tuple, list] = {}
    for s in segments:
        if s.src == src and s.payload:
            for o in s.mptcp("DSS"):
                if o.get("data_level_length"):
                    out.setdefault((o.get("dsn"), o.get("ssn"), o.get("data_level_length")), []).append(s)
    return out


@pytest.mark.families("ipv4", "ipv6")
@pytest.mark.rfc8684("R3.3-L01", "R3.3.1-16")
def test_isn_rewriting_firewall_leaves_mappings_valid(lab):
    """A firewall on the first path shifts each subflow's sequence numbers by a random offset (and
    the ACKs back): with DSS checksums on, the mappings must still hold, because their subflow
    sequence numbers are relative to the ISN (§3.3); the connection stays MPTCP, data intact."""
    lab.two_subflows(checksum=True)
    box = _attach(lab, "rewrite-seq", router="r1")
    run = lab.transfer(up=MB // 2, down=MB // 5, wait_subflows=2)
    e = lab.expect
    sent, seen = _first_subflow(run)
    shift = (seen.syn.seq - sent.syn.seq) & 0xFFFFFFFF
    e.that(shift != 0, "the client's ISN reaches the server shifted", expected="a different ISN",
           seen=f"{describe(sent.syn)} became {describe(seen.syn)}")
    client = sent.syn.src
    before, after = _mappings(sent.stream, client), _mappings(seen.stream, seen.syn.src)
    common = sorted(set(before) & set(after))
    e.that(len(common) >= 2 and len(common) == len(after), "every mapping the server receives on that subflow "
           "carries the subflow sequence number the client wrote (relative, unchanged by the shift)",
           expected="the same (DSN, SSN, length) on both sides, for 2 or more mappings",
           seen=f"{len(common)} of {len(after)} mappings also in the client's capture; "
                f"first: {describe(after[common[0]][0]) if common else 'none'}", rid="R3.3-L01")
    moved = [(a, b) for m in common for a, b in zip(before[m], after[m], strict=False)
             if (b.seq - a.seq) & 0xFFFFFFFF != shift]
    e.that(not moved, "each of those segments' TCP sequence number is shifted by the firewall's offset",
           expected=f"+{shift}", seen=f"{describe(moved[0][0])} -> {describe(moved[0][1])}" if moved else "all")
    for node in ("c1", "s1"):
        e.counter(run.counters, node, "DataCsumErr", 0, rid="R3.3-L01")
        e.counter(run.counters, node, "MPFailTx", 0, rid="R3.3-L01")
    box.expect_acted(e, at_least=10)
    run.expect_stays_mptcp(e)
    run.expect_intact(e)


@pytest.mark.families("ipv4", "ipv6")
@pytest.mark.rfc8684("R3.1-L02", "R3.3.1-16")
def test_resegmenting_middlebox_keeps_mappings_valid(lab):
    """A middlebox on the first path splits the client's data segments into pieces of at most 500
    bytes, copying the options to each piece (as segmentation offload does): the server receives
    the same DSS mapping on several segments and must take it as one mapping; with DSS checksums
    on, no checksum fails, the connection stays MPTCP and the data arrives intact."""
    lab.two_subflows(checksum=True)
    box = _attach(lab, "resegment", router="r1")
    run = lab.transfer(up=MB, down=MB // 5, wait_subflows=2)
    e = lab.expect
    _, seen = _first_subflow(run)
    received = _mappings(seen.stream, seen.syn.src)
    repeated = {m: segs for m, segs in received.items() if len(segs) > 1}
    sample = next(iter(repeated.values()), [])
    e.that(len(repeated) >= 3, "the server receives the same DSS mapping on several pieces",
           expected="3 or more mappings seen more than once",
           seen=f"{len(repeated)} repeated mappings; e.g. {', '.join(describe(s) for s in sample[:2]) or 'none'}",
           rid="R3.1-L02")
    too_big = [s for s in seen.stream if s.src == seen.syn.src and s.payload > 500]
    e.that(not too_big, "no data segment longer than 500 bytes passes the middlebox", expected="none",
           seen=describe(too_big[0]) if too_big else "none")
    known = lab.known_deviation("R3.1-L02")
    e.counter(run.counters, "s1", "DataCsumErr", 0, rid="R3.1-L02", deviation=known)
    e.counter(run.counters, "s1", "MPFailTx", 0, rid="R3.1-L02", deviation=known)
    e.counter(run.counters, "s1", "DSSNoMatchTCP", 0, rid="R3.1-L02")
    box.expect_acted(e, at_least=10)
    run.expect_stays_mptcp(e)
    run.expect_intact(e, rid="R3.1-L02", deviation=known)


@pytest.mark.families("ipv4", "ipv6")
@pytest.mark.rfc8684("R3.7-01", "R3.1-29")
def test_tcp_terminating_proxy_falls_back_to_tcp(lab):
    """A proxy on the first path terminates the client's TCP connection and opens its own to the
    server: the client's MP_CAPABLE SYN is answered as plain TCP, so the client falls back to TCP
    (and never tries to join), the server sees a plain TCP client, and the data arrives intact."""
    lab.two_subflows()
    box = _attach(lab, "tcp-proxy", router="r1")
    run = lab.transfer(up=MB, down=MB)
    e = lab.expect
    sent, seen = _handshakes(run)
    e.that(bool(sent.syn.mptcp("MP_CAPABLE")), "the client's SYN offers MP_CAPABLE", expected="MP_CAPABLE",
           seen=describe(sent.syn))
    e.that(not sent.synack.options, "the SYN/ACK the client gets (from the proxy) carries no MPTCP option",
           expected="none", seen=describe(sent.synack), rid="R3.7-01")
    e.that(not seen.syn.options and seen.syn.src != sent.syn.src,
           "the server's SYN comes from the proxy's own address, without MPTCP options", expected="plain TCP SYN",
           seen=describe(seen.syn))
    _no_options_after(e, sent.stream, sent.syn.src, sent.synack.frame,
                      "the client sends no MPTCP option after the plain SYN/ACK", "R3.1-29")
    joins = [h for h in handshakes(run.segments("c1-eth1")) if h.syn.mptcp("MP_JOIN")]
    e.that(not joins, "the client tries no join on the second path", expected="none",
           seen=describe(joins[0].syn) if joins else "none", rid="R3.7-01")
    e.counter(run.counters, "c1", "MPCapableFallbackSYNACK", 1, rid="R3.7-01")
    box.expect_acted(e, at_least=1, at_most=1)
    _fallback_reports(e, run, "R3.7-01")
    run.expect_intact(e)


def _unmapped(stream, src, isn):
    """Data segments from `src` no mapping covered when they arrived, and the byte ranges no
    mapping in the whole capture covers (relative subflow sequence numbers)."""
    maps: list[tuple[int, int]] = []
    early, ranges = [], []
    for s in stream:
        if s.src != src or not s.payload:
            continue
        for o in s.mptcp("DSS"):
            if o.get("data_level_length"):
                maps.append((o.get("ssn"), o.get("ssn") + o.get("data_level_length")))
        for o in s.mptcp("MP_CAPABLE"):  # the first data's mapping: from subflow sequence 1 (§3.1)
            if o.get("data_level_length"):
                maps.append((1, 1 + o.get("data_level_length")))
        start = (s.seq - isn) & 0xFFFFFFFF
        if not any(a <= start and start + s.payload <= b for a, b in maps):
            early.append(s)
            ranges.append((start, start + s.payload))
    never = [r for r in ranges if not any(a <= r[0] and r[1] <= b for a, b in maps)]
    return early, never


@pytest.mark.flaky(reruns=RERUNS, only_rerun=["NotExercised"])
@pytest.mark.families("ipv4", "ipv6")
@pytest.mark.rfc8684("R3.3-L02")
def test_coalescing_middlebox_keeps_the_data_intact(lab):
    """On the first path the MSS is clamped to 600 and a middlebox merges each pair of client data
    segments that fit in 1400 bytes, keeping the first one's options: DSS options are lost, so
    some data arrives beyond its segment's mapping or before any mapping of it. The receiver may
    hold it until a mapping comes or reset the subflow (§3.3.1, §3.7), but it must never deliver
    it at a data sequence number no mapping gave it: the application's stream stays intact, DSS
    checksums negotiated."""
    lab.two_subflows(checksum=True)  # they do not help: the mapping that is kept checks out
    _attach(lab, profile("clamp-mss", action=ClampMss(600), direction="s2c"), router="r1")
    box = _attach(lab, "coalesce", router="r1")
    run = lab.transfer(up=2 * MB, down=MB // 5, wait_subflows=2)
    e = lab.expect
    # Two segments make a merge. How many more pass depends on when the server resets the subflow
    # that lost a mapping (then the rest goes on the second path): the helper's report below and
    # the unmapped data are what prove the case happened.
    box.expect_acted(e, at_least=2)
    box.remove(lab.folder)
    report = box.helper_reports().get("r1", {})
    e.that(report.get("changed", 0) > 0 and report.get("options_lost", 0) > 0,
           "the middlebox merged segments and lost MPTCP options doing so", expected="merges with options lost",
           seen={k: report.get(k) for k in ("seen", "changed", "options_lost")})
    _, seen = _first_subflow(run)
    client = seen.syn.src
    early, never = _unmapped(seen.stream, client, seen.syn.seq)
    if not early:
        # Merges of segments that carried the same mapping lose nothing: the case did not happen.
        raise NotExercised("no merge lost the start of a mapping this time: R3.3-L02 was not exercised")
    resets = [s for s in seen.stream if s.src != client and s.has("R")]
    if never:  # every carrier of a mapping merged away: that data can never be Data-ACKed (§3.7)
        e.that(bool(resets), "the server resets the subflow whose data lost every mapping", expected="RST",
               seen=f"{len(never)} byte range(s) never mapped, first {never[0]}; resets: "
                    f"{describe(resets[0]) if resets else 'none'}", rid="R3.7-06")
    run.expect_intact(e, rid="R3.3-L02", deviation=lab.known_deviation("R3.3-L02"))
