"""RFC 8684 §3.7 (and §3.3.1): a payload byte changed on the path, with and without DSS checksums.

A `corrupt-data` middlebox on one router flips one byte of the client's Nth data segment. The TCP
checksum stays right (the router recomputes it), so only MPTCP's DSS checksum can notice. Each
case finds the changed segment on the wire itself, by comparing the client's capture before the
router with the server's capture after it, and judges both hosts' answers against §3.7."""

from __future__ import annotations

from pathlib import Path

import pytest
from scapy.layers.inet import TCP
from scapy.utils import PcapReader

from conformance.endpoints.linux import MptcpConfig
from conformance.errors import CapabilityMissing, NotExercised
from conformance.lab import MB, RERUNS
from conformance.middlebox import AlgRewrite, Match, Middlebox, profile
from conformance.observe.segments import Segment
from conformance.observe.wire import Handshake, describe, handshakes, initial_subflow

pytestmark = pytest.mark.topology("two_path")

# Far enough into the transfer that earlier mappings' checksums have already verified: Linux
# treats a failure before any checksum verified as a path that never carried MPTCP intact.
LATE = 300
# A join never falls back: there any failure is answered with RST + MP_FAIL, however early. Its
# share of the data (two paths) is smaller, so the change comes sooner.
EARLY_ON_JOIN = 20


def _corrupt(lab, nth: int, router: str) -> Middlebox:
    try:
        return lab.middlebox(profile("corrupt-data", match=Match("data", nth=nth)), router=router)
    except CapabilityMissing as exc:
        pytest.skip(f"this machine cannot run the case: {exc}")


def _payloads(pcap: Path, src: str, sport: int) -> dict[int, bytes]:
    """The first payload bytes captured for each sequence number `src`:`sport` sent (first copy)."""
    out: dict[int, bytes] = {}
    with PcapReader(str(pcap)) as packets:
        for pkt in packets:
            tcp = pkt.getlayer(TCP)
            if tcp is not None and tcp.sport == sport and pkt.payload.src == src and len(tcp.payload):
                out.setdefault(tcp.seq, bytes(tcp.payload))
    return out


def _changed(run, before: str, after: str, hs: Handshake) -> Segment | None:
    """The client's segment on subflow `hs` whose payload differs between `before` and `after`."""
    src, sport = hs.syn.src, hs.syn.sport
    sent, got = _payloads(run.pcaps[before], src, sport), _payloads(run.pcaps[after], src, sport)
    seq = next((s for s, data in got.items() if s in sent and sent[s][:len(data)] != data[:len(sent[s])]), None)
    return next((s for s in hs.stream if s.src == src and s.seq == seq and s.payload), None)


def _mapping_of(hs: Handshake, seg: Segment) -> tuple[int, int, int] | None:
    """(DSN, first SSN, data-level length) of the mapping that covers `seg` on subflow `hs`."""
    isn = hs.syn.seq
    rel = (seg.seq - isn) % 2**32
    for s in hs.stream:
        if s.src != seg.src:
            continue
        for o in s.mptcp("DSS"):
            length, ssn = o.get("data_level_length"), o.get("ssn")
            if length and ssn is not None and ssn <= rel < ssn + length:
                return o.get("dsn"), ssn, length
    return None


def _taken_elsewhere_first(at_server: list[Segment], join: Handshake, mapping: tuple[int, int, int]) -> bool:
    """Whether copies on other subflows covered the failed mapping's whole DSN range at the
    server before the join's copy of it was complete there, if it ever was (then a receiver never
    needs to check the failed one: it already has the data)."""
    dsn, ssn, length = mapping
    client, isn = join.syn.src, join.syn.seq
    ends = [s.time for s in join.stream if s.src == client and s.payload
            and (s.seq - isn) % 2**32 + s.payload >= ssn + length]
    # A mapping whose end never came on the join (the client finished elsewhere and closed) was
    # never complete there: no checksum over it could be computed at all.
    done = min(ends) if ends else float("inf")
    server, this = join.syn.dst, (join.syn.src, join.syn.sport)
    # The client's data on its other subflows (from its other addresses too) as the server got it.
    spans = sorted((o.get("dsn"), o.get("dsn") + o.get("data_level_length"))
                   for s in at_server if s.dst == server and (s.src, s.sport) != this and s.time < done
                   for o in s.mptcp("DSS") if o.get("data_level_length") and o.get("dsn") is not None)
    reach = dsn
    for a, b in spans:
        if a <= reach < b:
            reach = b
    return reach >= dsn + length


def _infinite_mapping(seg: Segment) -> tuple[int, int] | None:
    """(DSN, subflow sequence number) of the segment's infinite mapping (a DSS of data-level length 0)."""
    return next(((o.get("dsn"), o.get("ssn")) for o in seg.mptcp("DSS") if o.get("data_level_length") == 0), None)


def _mp_fails(segments: list[Segment], src: str) -> list[tuple[Segment, int]]:
    return [(s, o.get("dsn")) for s in segments if s.src == src for o in s.mptcp("MP_FAIL")]


def _reset_with_mp_fail(lab, join: Handshake, mapping: tuple[int, int, int] | None) -> tuple[Segment | None, int]:
    """§3.7 with several subflows: the server resets the join at once with RST + MP_FAIL, which
    names the DSN where the failed mapping starts. The RST, and the DSN the failed data starts
    at: the failed mapping's, as the wire shows it (the MP_FAIL's if that is not known)."""
    e = lab.expect
    server = join.syn.dst
    fails = _mp_fails(join.stream, server)
    rst = next((s for s, _ in fails if s.has("R")), None)
    e.that(rst is not None, "the server resets the join subflow with RST + MP_FAIL", expected="RST with MP_FAIL",
           seen=describe(fails[0][0]) if fails else "no MP_FAIL from the server", rid="R3.7-L01")
    dsn = next((d for s, d in fails if s is rst), 0)
    if rst is not None and mapping is not None:
        e.that(dsn == mapping[0], "the MP_FAIL names the DSN where the failed mapping starts",
               expected=f"{mapping[0]:#x} (mapping of SSN {mapping[1]}, {mapping[2]} bytes)",
               seen=f"{dsn:#x} in {describe(rst)}", rid="R3.7-L01", deviation=lab.known_deviation("R3.7-L01"))
        dsn = mapping[0]  # what §3.7 asks of the failed data is judged on the data that failed
    return rst, dsn


def _checksums(lab) -> None:
    for node in ("c1", "s1"):
        lab.configure(node, MptcpConfig(checksum=True))


@pytest.mark.flaky(reruns=RERUNS, only_rerun=["NotExercised"])
@pytest.mark.families("ipv4", "ipv6")
@pytest.mark.rfc8684("R3.7-L01", "R3.7-L02", "R3.7-09", "R3.7-08")
def test_checksum_failure_on_one_of_two_subflows_resets_it_with_mp_fail(lab):
    """Checksums negotiated, two subflows; one byte of a client data segment on the second path
    changes. The server must reset that subflow at once with RST + MP_FAIL naming the DSN where
    the failed mapping starts, never Data-ACK the failed data, and the client must send it again
    over the first subflow: both directions arrive intact."""
    lab.two_subflows(checksum=True)
    box = _corrupt(lab, EARLY_ON_JOIN, router="r2")
    run = lab.transfer(up=MB, down=MB, wait_subflows=2)
    e = lab.expect
    box.expect_acted(e, at_least=1, at_most=1)
    at_server = run.segments("s1-eth0")
    join = next((h for h in handshakes(at_server) if h.syn.mptcp("MP_JOIN")), None)
    first = initial_subflow(at_server, "s1-eth0")
    if join is None:
        pytest.fail("s1-eth0: no MP_JOIN handshake, the case needs two subflows")
    client_join = next(h for h in handshakes(run.segments("c1-eth1")) if h.syn.mptcp("MP_JOIN"))
    changed = _changed(run, "c1-eth1", "s1-eth0", client_join)
    if changed is None and box.hits() == 1:
        # The rule counts packets, retransmissions included: the one it changed was a later copy
        # of data the server had already taken intact, so no checksum could fail.
        raise NotExercised("the middlebox changed a retransmitted copy of data the server already had intact: "
                           "the checksum failure was not exercised")
    e.that(changed is not None, "the middlebox's change is on the wire: a client segment on the join arrives "
           "with other bytes than it left with", expected="one changed segment", seen=describe(changed))
    mapping = _mapping_of(client_join, changed) if changed else None
    server = join.syn.dst
    rst, dsn = _reset_with_mp_fail(lab, join, mapping)
    if rst is not None and mapping is not None:
        e.that(all(o.length == 12 for o in rst.mptcp("MP_FAIL")), "the MP_FAIL carries the full 64-bit DSN "
               "(12 bytes)", expected="length 12", seen=describe(rst), rid="R3.7-L02")
        _never_acked_before_resent(e, at_server, first, server, dsn, rst)
        _resent_elsewhere(e, run.segments("c1-eth0"), dsn, rst)
    run.expect_stays_mptcp(e, "the connection stays MPTCP on the first subflow")
    e.counter(run.counters, "s1", "DataCsumErr", 1)
    e.counter(run.counters, "s1", "MPFailTx", 1)
    # Whether c1 reads that MP_FAIL depends on its join still having a socket then (it may have
    # reset the join first): the counter oracle judges MPFailRx against the captures either way.
    run.expect_intact(e)


@pytest.mark.flaky(reruns=RERUNS, only_rerun=["NotExercised"])
@pytest.mark.families("ipv4")
@pytest.mark.rfc8684("R3.7-L01", "R3.7-09", "R3.7-08")
def test_alg_shortening_data_on_a_join_resets_it_with_mp_fail(lab):
    """Checksums negotiated, two subflows; on the second path an ALG rewrites a string in a client
    data segment to a shorter one (4 bytes cut) and shifts the sequence numbers after it both
    ways, so TCP goes on unaware. The mapping over the cut no longer checks out: the server must
    reset the join with RST + MP_FAIL naming where that mapping starts, never Data-ACK its data,
    and the client must send it again over the first subflow: both directions arrive intact."""
    lab.two_subflows(checksum=True)
    try:
        box = lab.middlebox(profile("alg-shorten", action=AlgRewrite(cut=4, nth=EARLY_ON_JOIN)), router="r2")
    except CapabilityMissing as exc:
        pytest.skip(f"this machine cannot run the case: {exc}")
    run = lab.transfer(up=MB, down=MB, wait_subflows=2)
    e = lab.expect
    box.expect_acted(e)
    box.remove(lab.folder)
    cuts = [f for r in box.helper_reports().values() for f in r.get("flows", [])]
    client_join = next(h for h in handshakes(run.segments("c1-eth1")) if h.syn.mptcp("MP_JOIN"))
    sent = sum(1 for s in client_join.stream if s.src == client_join.syn.src and s.payload)
    if not cuts and sent < EARLY_ON_JOIN:
        # The scheduler kept the data on the first subflow (the join came up late under load).
        raise NotExercised(f"the client sent {sent} data segment(s) on the join, fewer than the "
                           f"{EARLY_ON_JOIN}th the ALG rewrites: R3.7-L01 was not exercised")
    e.that(len(cuts) == 1, "the ALG cut bytes from one client data segment on the join", expected="one cut",
           seen=cuts or "none")
    cut_seq = (client_join.syn.seq + cuts[0]["cut_at"]) % 2**32 if cuts else None
    seg = next((s for s in client_join.stream if s.src == client_join.syn.src and s.payload
                and 0 <= (cut_seq - s.seq) % 2**32 < s.payload), None) if cuts else None
    mapping = _mapping_of(client_join, seg) if seg else None
    at_server = run.segments("s1-eth0")
    join = next((h for h in handshakes(at_server) if h.syn.mptcp("MP_JOIN")), None)
    if join is None:
        pytest.fail("s1-eth0: no MP_JOIN handshake, the case needs two subflows")
    server = join.syn.dst
    if mapping is not None and not _mp_fails(join.stream, server) \
            and _taken_elsewhere_first(at_server, join, mapping):
        raise NotExercised(f"the data of the cut mapping (DSN {mapping[0]:#x}, {mapping[2]} bytes) reached the "
                           "server complete over the first subflow (a reinjection) before the join delivered it: "
                           "the server had no use for the failed copy, R3.7-L01 was not exercised")
    rst, dsn = _reset_with_mp_fail(lab, join, mapping)
    if rst is not None and mapping is not None:
        _never_acked_before_resent(e, at_server, initial_subflow(at_server, "s1-eth0"), server, dsn, rst)
        _resent_elsewhere(e, run.segments("c1-eth0"), dsn, rst)
    run.expect_stays_mptcp(e, "the connection stays MPTCP on the first subflow")
    e.counter(run.counters, "s1", "DataCsumErr", range(1, 100))
    run.expect_intact(e)


def _never_acked_before_resent(e, at_server: list[Segment], first: Handshake, server: str, dsn: int,
                               rst: Segment) -> None:
    """§3.7: the failed data is not Data-ACKed until a copy of it came over the first subflow (all
    read at the server's interface, where both subflows pass). The client may have re-sent it
    there before the failure was found (a reinjection while the join lagged): that copy counts."""
    resent_at = next((s.time for s in first.stream if s.src != server
                      and any(_covers(o, dsn) for o in s.mptcp("DSS"))), None)
    early = next((s for s in at_server if s.src == server and (resent_at is None or s.time < resent_at)
                  and any(_acks_beyond(o, dsn) for o in s.mptcp("DSS"))), None)
    e.that(early is None, "no Data ACK from the server covers the failed data before the client re-sent it",
           expected=f"no Data ACK beyond {dsn:#x} before the retransmission", seen=describe(early), rid="R3.7-09")


def _resent_elsewhere(e, at_client_first: list[Segment], dsn: int, rst: Segment) -> None:
    """The receiver of MP_FAIL treats the data from its DSN on as not delivered: it sends it again
    on the subflow that remains (after the reset, or already before it, as a reinjection)."""
    again = next((s for s in at_client_first if any(_covers(o, dsn) for o in s.mptcp("DSS"))), None)
    when = "" if again is None else (" (after the reset)" if again.time > rst.time else " (before the reset)")
    e.that(again is not None, "the client sends the data from the MP_FAIL's DSN again on the first subflow",
           expected=f"a mapping covering {dsn:#x}", seen=describe(again) + when, rid="R3.7-08")


def _acks_beyond(o, dsn: int) -> bool:
    """A DSS whose Data ACK (64- or 32-bit) acknowledges the byte at `dsn`."""
    flags, ack = o.get("flags", 0), o.get("data_ack")
    if not flags & 0x01 or ack is None:
        return False
    bits = 64 if flags & 0x02 else 32
    return 0 < (ack - dsn) % 2**bits < 2 ** (bits - 1)


def _covers(o, dsn: int) -> bool:
    start, length = o.get("dsn"), o.get("data_level_length")
    if start is None or not length or not o.get("flags", 0) & 0x08:  # 64-bit mappings only
        return False
    return 0 <= (dsn - start) % 2**64 < length


@pytest.mark.families("ipv4")
@pytest.mark.rfc8684("R3.7-L03", "R3.7-10")
def test_checksum_failure_on_the_only_subflow_falls_back_to_tcp(lab):
    """Checksums negotiated, one subflow, the client sending (the server only answers, so all
    data in flight is contiguous); one byte of a late client segment changes. The server sends
    MP_FAIL on an ACK; the client, receiving it, must send MP_FAIL back and revert entirely to
    plain TCP (an infinite mapping, then no more options): the rest of its data must still
    arrive."""
    _checksums(lab)
    box = _corrupt(lab, LATE, router="r1")
    run = lab.transfer(up=MB, down=0, timeout=20)
    e = lab.expect
    box.expect_acted(e, at_least=1, at_most=1)
    hs = initial_subflow(run.segments("c1-eth0"), "c1-eth0")
    client, server = hs.syn.src, hs.syn.dst
    from_server = _mp_fails(hs.stream, server)
    e.that(bool(from_server) and not from_server[0][0].has("R"), "the server signals the failure with MP_FAIL "
           "on an ACK (all data in flight is contiguous: no reset)", expected="MP_FAIL without RST",
           seen=describe(from_server[0][0]) if from_server else "no MP_FAIL from the server", rid="R3.7-L03")
    e.counter(run.counters, "s1", "DataCsumErr", 1)
    e.counter(run.counters, "c1", "MPFailRx", 1)
    if not from_server:
        return
    signalled = from_server[0][0]
    answer = next((s for s, _ in _mp_fails(hs.stream, client) if s.time >= signalled.time), None)
    deviation = lab.known_deviation("R3.7-10")
    after = [describe(s) for s in hs.stream if s.src == client and s.time >= signalled.time][:3]
    e.that(answer is not None, "the client, receiving MP_FAIL, sends MP_FAIL back",
           expected="MP_FAIL from the client", seen=describe(answer) if answer else f"none; it sent {after}",
           rid="R3.7-10", deviation=deviation)
    infinite = next((s for s in hs.stream if s.src == client and s.time >= signalled.time
                     and any(o.get("data_level_length") == 0 for o in s.mptcp("DSS"))), None)
    data_after = [s for s in hs.stream if s.src == client and s.payload and s.time > signalled.time]
    e.that(infinite is not None, "the client reverts to plain TCP, starting with an infinite mapping (DSS, "
           "data-level length 0)", expected="a DSS of length 0 on the wire",
           seen=f"none; c1 MPTcpExtInfiniteMapTx {run.counter('c1', 'InfiniteMapTx')}; {len(data_after)} client "
           f"data segments after the MP_FAIL, the last {describe(data_after[-1] if data_after else None)}",
           rid="R3.7-10", deviation=deviation)
    if infinite is not None:
        # A retransmission of the data that carried the infinite mapping repeats the mapping (same
        # DSN and subflow sequence number, length 0; the segment may be cut or merged differently
        # and its Data ACK is fresh): not a return to MPTCP.
        mapping = _infinite_mapping(infinite)
        later = [s for s in hs.stream if s.src == client and s.time > infinite.time and s.options
                 and not (len(s.options) == 1 and _infinite_mapping(s) == mapping)]
        e.that(not later, "after its infinite mapping the client sends no MPTCP option again", expected="none",
               seen=describe(later[0]) if later else "none", rid="R3.7-17")
    e.that(run.server.get("bytes_received") == MB, "the client's data keeps flowing as plain TCP until all of "
           "it has arrived", expected=f"{MB} bytes at the server",
           seen=f"{run.server.get('bytes_received')} bytes ({run.server.get('error')}); the client's subflow at "
           f"the end: {_unsent(run)}", rid="R3.7-10", deviation=deviation)


def _unsent(run) -> str:
    """What `ss` said of the client's subflow when the transfer ended (state, unsent bytes)."""
    path = run.folder / "ss-c1.txt"
    if not path.is_file():
        return "no ss snapshot"
    lines = path.read_text().splitlines()
    state = next((ln.split()[0] for ln in lines if ln and not ln.startswith(("$", "\t", " "))), "?")
    unsent = next((w for ln in lines for w in ln.split() if w.startswith("notsent:")), "notsent:0")
    window = next((w for ln in lines for w in ln.split() if w.startswith("snd_wnd:")), "")
    return f"{state} {unsent} {window}".strip()


@pytest.mark.families("ipv4")
@pytest.mark.rfc8684("R3.7-L03")
def test_checksum_failure_before_any_checksum_verified_is_signalled(lab):
    """Checksums negotiated, one subflow; a byte of the client's 5th data segment changes, inside
    the first mapping, before any checksum has verified. The RFC's single-subflow procedure still
    applies: the receiver signals the failure with MP_FAIL."""
    _checksums(lab)
    box = _corrupt(lab, 5, router="r1")
    run = lab.transfer(up=MB, down=MB, timeout=20)
    e = lab.expect
    box.expect_acted(e, at_least=1, at_most=1)
    hs = initial_subflow(run.segments("s1-eth0"), "s1-eth0")
    fails = _mp_fails(hs.stream, hs.syn.dst)
    bare = next((s for s in hs.stream if s.src == hs.syn.dst and s.payload and not s.options), None)
    e.that(bool(fails), "the server signals the checksum failure with MP_FAIL", expected="MP_FAIL from the server",
           seen=describe(fails[0][0]) if fails else f"no MP_FAIL; server counters {run.counters.get('s1')}; "
           f"its first data without MPTCP options: {describe(bare)}; the server's application received "
           f"{'other bytes than sent' if run.server.get('ok') is False else 'the bytes sent'}",
           rid="R3.7-L03", deviation=lab.known_deviation("R3.7-L03"))
    e.counter(run.counters, "s1", "DataCsumErr", 1)


@pytest.mark.families("ipv4")
@pytest.mark.rfc8684("R3.3.1-04")
def test_payload_change_without_checksums_goes_unnoticed(lab):
    """Checksums not negotiated (Linux's default): the same change cannot be detected (§3.7: the
    fallback mechanism needs checksums). Recorded: no MP_FAIL, no reset, the connection stays
    MPTCP, and the server's application receives the changed bytes."""
    box = _corrupt(lab, LATE, router="r1")
    run = lab.transfer(up=MB, down=MB)
    e = lab.expect
    box.expect_acted(e, at_least=1, at_most=1)
    hs = initial_subflow(run.segments("s1-eth0"), "s1-eth0")
    changed = _changed(run, "c1-eth0", "s1-eth0", initial_subflow(run.segments("c1-eth0"), "c1-eth0"))
    e.that(changed is not None, "the middlebox's change is on the wire", expected="one changed segment",
           seen=describe(changed))
    noticed = [s for s in hs.stream if s.mptcp("MP_FAIL") or s.has("R")]
    e.that(not noticed, "without checksums neither host can notice: no MP_FAIL, no reset", expected="none",
           seen=describe(noticed[0]) if noticed else "none")
    run.expect_stays_mptcp(e)
    e.that(run.server.get("sha256_received") != run.server.get("sha256_expected")
           and run.server.get("bytes_received") == MB,
           "the server's application receives all the bytes, one of them changed (what checksums are for; "
           "R3.3.1-04 recommends them)", expected="same length, other SHA-256",
           seen={k: run.server.get(k) for k in ("bytes_received", "sha256_received", "sha256_expected")},
           rid="R3.3.1-04", deviation=lab.known_deviation("R3.3.1-04"))
    e.counter(run.counters, "s1", "DataCsumErr", 0)
