"""RFC 8684 §3.3.2 and §3.3.6: a path fails mid-transfer.

Two subflows over two shaped paths; while the client is sending, path 2's router starts dropping
everything (the links stay up: nothing tells the hosts). The data the client had sent on the
join and never saw subflow-ACKed must still reach the server: sent again over the first subflow
(reinjection), while the join keeps retransmitting it too. Judged on the client's own interfaces,
where both its subflows are seen as it sent them."""

from __future__ import annotations

import time

import pytest

from conformance.lab import MB
from conformance.observe.segments import Segment
from conformance.observe.wire import Handshake, describe, handshakes, initial_subflow

pytestmark = pytest.mark.topology("two_path", bw=16)


def _lost(sent: Handshake, at_server: list[Segment]) -> Segment | None:
    """The client's first data segment on subflow `sent` (its own capture) that never reached the
    server. Data that did reach it may be Data-ACKed over the other subflow even though its
    subflow ACK was lost: only lost data must be sent again elsewhere."""
    client, port = sent.syn.src, sent.syn.sport
    arrived = {s.seq for s in at_server if s.src == client and s.sport == port and s.payload}
    return next((s for s in sent.stream if s.src == client and s.payload and s.seq not in arrived), None)


def _dsn_of(hs: Handshake, seg: Segment) -> int | None:
    """The 64-bit DSN of `seg`'s first byte, from the mapping that covers it."""
    rel = (seg.seq - hs.syn.seq) % 2**32
    for s in hs.stream:
        for o in s.mptcp("DSS") if s.src == seg.src else ():
            ssn, length = o.get("ssn"), o.get("data_level_length")
            if length and ssn is not None and ssn <= rel < ssn + length and o.get("flags", 0) & 0x08:
                return (o.get("dsn") + rel - ssn) % 2**64
    return None


def _mapped_at(stream: list[Segment], src: str, dsn: int, after: float) -> Segment | None:
    """The first segment from `src` after `after` whose 64-bit mapping covers `dsn`."""
    for s in stream:
        if s.src != src or s.time <= after or not s.payload:
            continue
        for o in s.mptcp("DSS"):
            start, length = o.get("dsn"), o.get("data_level_length")
            if start is not None and length and o.get("flags", 0) & 0x08 and 0 <= (dsn - start) % 2**64 < length:
                return s
    return None


@pytest.mark.families("ipv4", "ipv6")
@pytest.mark.rfc8684("R3.3.2-04", "R3.3.6-01")
def test_path_failure_mid_transfer_reinjects_on_the_other_subflow(lab):
    """Path 2 blackholed while the client sends: the client's data in flight on the join is sent
    again on the first subflow, still retransmitted on the join, and everything arrives intact."""
    lab.two_subflows()
    broke: list[float] = []

    def during(port: int) -> None:
        lab.wait_established("c1", port, 2)
        time.sleep(0.3)  # both subflows carry data by now
        broke.append(time.time())
        lab.blackhole(2)

    # About 3 s at 16 Mbit/s per path: under load the wait above can take a second or more, and
    # the path must still fail mid-transfer.
    run = lab.transfer(up=12 * MB, down=MB, wait_subflows=2, timeout=60, during=during)
    e = lab.expect
    e.that(bool(broke), "path 2 was blackholed mid-transfer", expected="a time", seen=broke)
    first = initial_subflow(run.segments("c1-eth0"), "c1-eth0")
    join = next((h for h in handshakes(run.segments("c1-eth1")) if h.syn.mptcp("MP_JOIN")), None)
    if join is None or not broke:
        pytest.fail("c1-eth1: no MP_JOIN handshake before the path failed, the case needs two subflows")
    client = join.syn.src
    stuck = _lost(join, run.segments("s1-eth0"))
    e.that(stuck is not None, "the client sent data on the join that the failed path never delivered",
           expected="a data segment missing at the server", seen=describe(stuck))
    dsn = _dsn_of(join, stuck) if stuck else None
    if stuck is not None:
        e.that(dsn is not None, "that data is mapped (64-bit DSN)", expected="a mapping", seen=describe(stuck))
    if dsn is not None:
        again = _mapped_at(first.stream, first.syn.src, dsn, stuck.time)
        e.that(again is not None, "the client sends that data again on the first subflow (it kept it: neither "
               "Data-ACKed nor subflow-ACKed on the join)", expected=f"a mapping covering DSN {dsn:#x} after the "
               "failure", seen=describe(again), rid="R3.3.2-04")
        # TCP retransmits from the oldest unacknowledged byte, one segment per timeout: a
        # retransmission at or before the lost data after the reinjection shows the join still
        # holds (and will resend) that data.
        retried = next((s for s in join.stream if s.src == client and s.payload and again is not None
                        and s.time > again.time and (stuck.seq - s.seq) % 2**32 < 2**31), None)
        e.that(retried is not None and again is not None and retried.time > again.time,
               "after reinjecting it the client still retransmits on the join, from its oldest unacknowledged "
               "data on", expected="a join retransmission at or before the lost data, after the reinjection",
               seen=f"reinjected {describe(again)}; on the join {describe(retried)}", rid="R3.3.6-01")
    run.expect_stays_mptcp(e)
    run.expect_intact(e)
