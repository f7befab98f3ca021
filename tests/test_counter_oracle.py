"""The kernel's MIB counters as a third oracle (conformance.observe.counter_oracle).

Synthetic: captures written with scapy and our option classes, one per node (each node's own
vantage), fed to the connection model and compared with made-up counter deltas: the right deltas
agree, a wrong one is named. Live (root): kernel-to-kernel transfers through the Lab, where every
compared counter of both hosts must agree with their captures, and the counters that the
transfer is about must have been exercised (so an empty comparison cannot pass)."""

from __future__ import annotations

import ipaddress
import json
import os
import sys
import time
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

from conformance.observe.counter_oracle import (
    EXACT,
    HMAC_SUM,
    NONZERO,
    RANGE,
    CounterAgreement,
    compare_counters,
    disagreements,
    node_captures,
)
from conformance.observe.model import build
from conformance.wire import (
    DSS,
    AddAddr,
    MPCapable,
    MPFail,
    MPFastclose,
    MPJoinAck,
    MPJoinSyn,
    MPJoinSynAck,
    MPPrio,
    MPTCPRst,
    RemoveAddr,
    crypto,
)

KEY_C, KEY_S = 0x0102030405060708, 0x1112131415161718
R_C, R_S = 0x01020304, 0x05060708
C1, C2, S, S2 = "198.18.1.2", "198.18.2.2", "198.19.0.2", "198.19.2.2"
ADDRESSES = {"c1": {C1, C2}, "s1": {S, S2}}
P = "MPTcpExt"


class Wire:
    """Segments in time order, with per-direction sequence numbers kept like TCP's."""

    def __init__(self) -> None:
        self.pkts: list = []
        self.nxt: dict[tuple, int] = {}
        self.t = 1_000_000.0

    def seg(self, src: str, sport: int, dst: str, dport: int, flags: str, opts=(), payload: bytes = b"",
            seq: int | None = None):
        key, rev = (src, sport, dst, dport), (dst, dport, src, sport)
        nxt = self.nxt.setdefault(key, 1000 + 100_000 * len(self.nxt))
        seq = nxt if seq is None else seq
        ack = self.nxt.get(rev, 0) if "A" in flags else 0
        pkt = Ether() / IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack,
                                                   options=list(opts)) / payload
        pkt.time = self.t
        self.t += 0.001
        self.nxt[key] = max(nxt, seq + len(payload) + ("S" in flags) + ("F" in flags))
        self.pkts.append(pkt)
        return pkt

    def write(self, folder: Path, lost_before: dict[str, set[int]] | None = None) -> dict[str, list[Path]]:
        """One capture per host. lost_before: node -> indexes of segments that never reach it."""
        out = {}
        for node, addrs in ADDRESSES.items():
            gone = (lost_before or {}).get(node, set())
            keep = [p for i, p in enumerate(self.pkts)
                    if not (i in gone and p[IP].dst in addrs)]
            path = folder / f"{node}-eth0.pcap"
            wrpcap(str(path), keep)
            out[node] = [path]
        return out


def handshake(w: Wire, *, checksum: bool = False, retransmit_syn: bool = False) -> None:
    flags = "AH" if checksum else "H"
    w.seg(C1, 40000, S, 80, "S", [MPCapable(flags=flags)])
    if retransmit_syn:  # the SYN/ACK was slow: the same SYN again
        w.seg(C1, 40000, S, 80, "S", [MPCapable(flags=flags)], seq=1000)
    w.seg(S, 80, C1, 40000, "SA", [MPCapable(flags=flags, sender_key=KEY_S)])
    w.seg(C1, 40000, S, 80, "A", [MPCapable(flags=flags, sender_key=KEY_C, receiver_key=KEY_S)])


def join(w: Wire, *, synack_ok: bool = True, ack_ok: bool = True) -> None:
    mac = crypto.join_synack_hmac(KEY_S, KEY_C, R_S, R_C) ^ (0 if synack_ok else 1)
    w.seg(C2, 40001, S, 80, "S", [MPJoinSyn(address_id=1, receiver_token=crypto.token(KEY_S), sender_random=R_C)])
    w.seg(S, 80, C2, 40001, "SA", [MPJoinSynAck(address_id=0, sender_truncated_hmac=mac, sender_random=R_S)])
    if not synack_ok:  # the initiator resets its subflow (RST with ACK: from its socket)
        w.seg(C2, 40001, S, 80, "RA", [MPTCPRst(reason=1)])
        return
    hmac = crypto.join_hmac(KEY_C, KEY_S, R_C, R_S)[:20] if ack_ok else bytes(20)
    w.seg(C2, 40001, S, 80, "A", [MPJoinAck(sender_hmac=hmac)])
    if ack_ok:
        w.seg(S, 80, C2, 40001, "A", [DSS(flags="Aa", data_ack=crypto.idsn(KEY_C) + 1)])
    else:  # the listener refuses: a reset in reply to the third ACK (no ACK flag, no socket)
        w.seg(S, 80, C2, 40001, "R", [MPTCPRst(reason=5)])


def add_addr(w: Wire, *, echo: bool = True) -> int:
    addr = ipaddress.ip_address(S2)
    mac = crypto.add_addr_hmac(KEY_S, KEY_C, 5, addr.packed, None)
    w.seg(S, 80, C1, 40000, "A", [AddAddr(address_id=5, address=S2, truncated_hmac=mac)])
    index = len(w.pkts) - 1
    if echo:
        w.seg(C1, 40000, S, 80, "A", [AddAddr(echo=1, address_id=5, address=S2)])
    return index


def compare(tmp_path: Path, w: Wire, counters: dict, **kw) -> dict[tuple[str, str], CounterAgreement]:
    caps = w.write(tmp_path, kw.pop("lost_before", None))
    conns = build([caps["c1"][0], caps["s1"][0]])
    result = compare_counters(conns, counters, ADDRESSES, caps, **kw)
    return {(a.node, a.counter.removeprefix(P)): a for a in result}


def deltas(**nodes: dict[str, int]) -> dict[str, dict[str, int]]:
    return {node: {P + k: v for k, v in values.items()} for node, values in nodes.items()}


# The kernel's counts for `handshake`, and for a `join` the listener sent its SYN/ACK for.
HANDSHAKE = {"c1": {"MPCapableSYNTX": 1, "MPCapableSYNACKRX": 1}, "s1": {"MPCapableSYNRX": 1, "MPCapableACKRX": 1}}
JOIN_SYN = {"c1": {"MPJoinSynTx": 1}, "s1": {"MPJoinSynRx": 1}}


def with_handshake(*, join: bool = False, **nodes: dict[str, int]) -> dict[str, dict[str, int]]:
    out = {n: dict(HANDSHAKE[n]) | (JOIN_SYN[n] if join else {}) for n in ("c1", "s1")}
    for node, values in nodes.items():
        out[node] |= values
    return deltas(**out)


# What the kernel counts for `main_transfer`, per node (checked live below for the same events).
MAIN_C1 = {"MPCapableSYNTX": 1, "MPCapableSYNACKRX": 1, "MPJoinSynTx": 1, "MPJoinSynAckRx": 1, "AddAddr": 2,
           "EchoAddTx": 2, "MPPrioRx": 1, "RmAddr": 1}
MAIN_S1 = {"MPCapableSYNRX": 1, "MPCapableACKRX": 1, "MPJoinSynRx": 1, "MPJoinAckRx": 1, "AddAddrTx": 2,
           "EchoAdd": 2, "MPPrioTx": 1, "RmAddrTx": 1}


def main_transfer() -> Wire:
    w = Wire()
    handshake(w, retransmit_syn=True)
    add_addr(w)
    add_addr(w)  # the ADD_ADDR again (its retransmission timer): counted again on both sides
    join(w)
    w.seg(S, 80, C2, 40001, "A", [DSS(flags="Aa", data_ack=crypto.idsn(KEY_C) + 1), MPPrio(backup=1)])
    w.seg(S, 80, C1, 40000, "A", [RemoveAddr(address_ids=[5])])
    return w


def test_every_counter_agrees_with_the_kernel_deltas_of_the_same_events(tmp_path):
    got = compare(tmp_path, main_transfer(), deltas(c1=MAIN_C1, s1=MAIN_S1))
    assert not disagreements(got.values()), [str(a) for a in disagreements(got.values())]
    for node, expected in (("c1", MAIN_C1), ("s1", MAIN_S1)):
        for name, n in expected.items():
            a = got[(node, name)]
            assert (a.implied, a.possible, a.how, a.low, a.high) == (n, 0, EXACT, n, n), str(a)
    # Handshakes count once per subflow: the retransmitted SYN is not a second MPCapableSYNRX.
    assert got[("s1", "MPCapableSYNRX")].where[0].frame == 1
    # What did not happen is compared too, and must be zero.
    assert got[("c1", "MPFastcloseRx")].high == 0 and got[("s1", "MPJoinPortSynRx")].high == 0
    assert {a.node for a in got.values()} == {"c1", "s1"}


def test_a_kernel_delta_that_differs_is_named_with_its_frames(tmp_path):
    wrong = deltas(c1=MAIN_C1, s1=MAIN_S1 | {"MPCapableSYNRX": 2, "EchoAdd": 1})
    bad = disagreements(compare(tmp_path, main_transfer(), wrong).values())
    assert {(a.node, a.counter) for a in bad} == {("s1", P + "MPCapableSYNRX"), ("s1", P + "EchoAdd")}
    syn = next(a for a in bad if a.counter.endswith("SYNRX"))
    assert (syn.kernel, syn.expected) == (2, "1") and "s1-eth0.pcap frame 1" in str(syn)


def test_a_segment_lost_before_the_receiver_is_sent_but_not_received(tmp_path):
    w = Wire()
    handshake(w)
    lost = add_addr(w, echo=False)  # dropped on the way: in s1's capture, never in c1's
    got = compare(tmp_path, w, with_handshake(s1={"AddAddrTx": 1}), lost_before={"c1": {lost}})
    assert got[("s1", "AddAddrTx")].implied == 1 and got[("c1", "AddAddr")].implied == 0
    assert not disagreements(got.values())


def test_an_add_addr_with_a_wrong_hmac_is_not_counted(tmp_path):
    w = Wire()
    handshake(w)
    w.seg(S, 80, C1, 40000, "A", [AddAddr(address_id=5, address=S2, truncated_hmac=1)])
    got = compare(tmp_path, w, with_handshake(s1={"AddAddrTx": 1}))
    assert not disagreements(got.values())
    assert got[("c1", "AddAddr")].high == 0 and got[("s1", "AddAddrTx")].implied == 1


def test_a_bad_third_ack_hmac_is_a_failure_and_not_a_join(tmp_path):
    w = Wire()
    handshake(w)
    join(w, ack_ok=False)
    got = compare(tmp_path, w, with_handshake(join=True, s1={"MPJoinAckHMacFailure": 1}, c1={"MPJoinSynAckRx": 1}))
    assert got[("s1", "MPJoinAckHMacFailure")].implied == 1 and got[("s1", "MPJoinAckRx")].high == 0
    assert got[("s1", "MPJoinSynRx")].implied == 1  # the SYN was answered with an MP_JOIN SYN/ACK
    # The reset in reply to the third ACK comes from no socket: the kernel writes it uncounted.
    assert got[("s1", "MPRstTx")].high == 0
    assert not disagreements(got.values()), [str(a) for a in disagreements(got.values())]
    got = compare(tmp_path, w, with_handshake(join=True, s1={"MPJoinAckRx": 1}, c1={"MPJoinSynAckRx": 1}))
    assert {a.counter for a in disagreements(got.values())} == {P + "MPJoinAckRx", P + "MPJoinAckHMacFailure",
                                                                HMAC_SUM}


@pytest.mark.parametrize("counted_as", ["MPJoinSynAckHMacFailure", "MPJoinAckHMacFailure"])
def test_a_bad_synack_hmac_may_be_counted_under_either_name_but_is_counted(tmp_path, counted_as):
    """Kernels before commit c4a99a921949 count it as MPJoinAckHMacFailure, later ones as
    MPJoinSynAckHMacFailure: both agree, a kernel counting neither does not."""
    w = Wire()
    handshake(w)
    join(w, synack_ok=False)
    got = compare(tmp_path, w, with_handshake(join=True, c1={counted_as: 1, "MPRstTx": 1}))
    assert not disagreements(got.values()), [str(a) for a in disagreements(got.values())]
    both = got[("c1", HMAC_SUM.removeprefix(P))]
    assert (both.implied, both.how, both.kernel) == (1, EXACT, 1)
    assert got[("c1", "MPJoinSynAckHMacFailure")].how == RANGE and got[("c1", "MPJoinSynAckRx")].high == 0
    assert got[("c1", "MPRstTx")].implied == 1  # RST with ACK from the subflow's socket
    got = compare(tmp_path, w, with_handshake(join=True, c1={"MPRstTx": 1}))
    assert [a.counter for a in disagreements(got.values())] == [HMAC_SUM]


def established(w: Wire) -> None:
    """Data both ways after the handshake: each side has the other's Data ACK."""
    handshake(w)
    w.seg(C1, 40000, S, 80, "PA", [DSS(flags="AaMm", data_ack=1, dsn=1, ssn=1, data_level_length=100)],
          payload=b"x" * 100)
    w.seg(S, 80, C1, 40000, "PA", [DSS(flags="AaMm", data_ack=101, dsn=1, ssn=1, data_level_length=100)],
          payload=b"y" * 100)


def test_resets_count_when_written_by_a_socket_and_read_in_sequence(tmp_path):
    w = Wire()
    established(w)
    # MP_FASTCLOSE naming a key that is not c1's: written by s1, ignored by c1; MP_TCPRST read.
    w.seg(S, 80, C1, 40000, "RA", [MPFastclose(receiver_key=KEY_S), MPTCPRst(reason=0)])
    # s1 has no socket for the subflow any more: a reset in reply (no ACK flag) is written by no
    # socket, and c1's subflow is gone too.
    w.seg(S, 80, C1, 40000, "R", [MPTCPRst(reason=1)])
    got = compare(tmp_path, w, with_handshake(s1={"MPFastcloseTx": 1, "MPRstTx": 1}, c1={"MPRstRx": 1}))
    assert not disagreements(got.values()), [str(a) for a in disagreements(got.values())]
    assert got[("c1", "MPRstRx")].implied == 1 and got[("c1", "MPFastcloseRx")].high == 0
    assert (got[("s1", "MPRstTx")].implied, got[("s1", "MPRstTx")].possible) == (1, 0)


def test_a_reset_out_of_sequence_is_not_read(tmp_path):
    w = Wire()
    established(w)
    w.seg(S, 80, C1, 40000, "RA", [MPTCPRst(reason=0)], seq=5)  # RFC 5961: a challenge ACK, no reset
    got = compare(tmp_path, w, with_handshake(s1={"MPRstTx": 1}))
    assert got[("c1", "MPRstRx")].high == 0 and got[("s1", "MPRstTx")].implied == 1
    assert not disagreements(got.values())


@pytest.mark.parametrize("kernel_read", [0, 1])
def test_a_reset_after_the_nodes_acknowledged_fin_may_go_unread(tmp_path, kernel_read):
    # s1 closes the subflow (FIN), c1 acknowledges it and then resets in sequence. If s1 had
    # orphaned the subflow it is now a FIN_WAIT2 timewait socket that reads no option: either
    # count is right (seen live, REMOVE_ADDR then the peer's MP_TCPRST).
    w = Wire()
    established(w)
    w.seg(S, 80, C1, 40000, "FA", [DSS(flags="Aa", data_ack=101)])
    w.seg(C1, 40000, S, 80, "A", [DSS(flags="Aa", data_ack=101)])
    w.seg(C1, 40000, S, 80, "RA", [MPTCPRst(reason=0)])
    got = compare(tmp_path, w, with_handshake(c1={"MPRstTx": 1}, s1={"MPRstRx": kernel_read}))
    rst = got[("s1", "MPRstRx")]
    assert (rst.low, rst.high) == (0, 1) and "FIN was acknowledged" in rst.explanation
    assert not disagreements(got.values()), [str(a) for a in disagreements(got.values())]


@pytest.mark.parametrize("answer", ["socket-reset", "ack"])
def test_a_reset_in_sequence_is_settled_by_what_the_node_sends_next(tmp_path, answer):
    # s1's stack discarded c1's last data (seen live: unmapped data on a join not yet fully
    # established), so c1's reset, in sequence by the captures, is not: s1 resets the subflow
    # itself (a socket: RST with ACK), or answers with a challenge ACK (or data queued before).
    w = Wire()
    established(w)
    w.seg(C1, 40000, S, 80, "A", [DSS(flags="AaMm", data_ack=101, dsn=101, ssn=101, data_level_length=50)],
          payload=b"z" * 50)  # captured at s1, dropped by its stack
    w.seg(C1, 40000, S, 80, "RA", [MPTCPRst(reason=0)])
    if answer == "socket-reset":
        w.seg(S, 80, C1, 40000, "RA", [MPTCPRst(reason=6)], seq=101 + 100_000)
        kernel = with_handshake(c1={"MPRstTx": 1}, s1={"MPRstTx": 1})
    else:
        w.seg(S, 80, C1, 40000, "A", [DSS(flags="Aa", data_ack=101)])
        kernel = with_handshake(c1={"MPRstTx": 1})
    got = compare(tmp_path, w, kernel)
    assert not disagreements(got.values()), [str(a) for a in disagreements(got.values())]
    rx, tx = got[("s1", "MPRstRx")], got[("s1", "MPRstTx")]
    if answer == "socket-reset":
        # Linux 6.1's fast close reads the peer's reset and still resets that subflow itself
        # (seen live against a 6.1 guest): the captures cannot tell that from an unread reset.
        assert (rx.low, rx.high, tx.low, tx.high) == (0, 1, 1, 1) and "fast close" in rx.explanation
    else:
        assert (rx.low, rx.high) == (0, 1) and "challenge ACK" in rx.explanation


def test_the_mp_fail_answer_after_a_fallback_began_may_still_be_read(tmp_path):
    # Seen live (checksum failure on the only subflow): s1 sends MP_FAIL and goes on as plain TCP
    # at once; c1's MP_FAIL answer arrives after that point, and s1's kernel may still read it.
    w = Wire()
    handshake(w, checksum=True)
    w.seg(S, 80, C1, 40000, "A", [DSS(flags="Aa", data_ack=1)])
    w.seg(S, 80, C1, 40000, "A", [DSS(flags="Aa", data_ack=1), MPFail(dsn=7)])
    w.seg(S, 80, C1, 40000, "PA", payload=b"p" * 50)  # s1 speaks no MPTCP from here on
    w.seg(C1, 40000, S, 80, "A", [DSS(flags="A", data_ack=51), MPFail(dsn=7)])
    w.seg(C1, 40000, S, 80, "PA", payload=b"q" * 50)
    for read in (0, 1):
        got = compare(tmp_path, w, with_handshake(s1={"MPFailTx": 1, "DataCsumErr": 1, "MPFailRx": read},
                                                   c1={"MPFailRx": 1, "MPFailTx": 1}))
        assert not disagreements(got.values()), [str(a) for a in disagreements(got.values())]
        rx, tx = got[("s1", "MPFailRx")], got[("c1", "MPFailTx")]
        assert (rx.low, rx.high, tx.low, tx.high) == (0, 1, 1, 1) and "fell back" in rx.explanation


def test_options_before_the_initiator_is_fully_established_are_only_possible(tmp_path):
    w = Wire()
    handshake(w)  # no Data ACK from s1 yet: c1's subflow is not fully established
    w.seg(S, 80, C1, 40000, "A", [MPPrio(backup=1)])
    got = compare(tmp_path, w, with_handshake(s1={"MPPrioTx": 1}))
    prio = got[("c1", "MPPrioRx")]
    assert (prio.low, prio.high) == (0, 1) and "fully established" in prio.explanation


def test_data_csum_err_is_judged_zero_versus_nonzero(tmp_path):
    w = Wire()
    handshake(w, checksum=True)
    w.seg(S, 80, C1, 40000, "A", [DSS(flags="Aa", data_ack=1)])
    w.seg(S, 80, C1, 40000, "A", [DSS(flags="Aa", data_ack=1), MPFail(dsn=7)])  # s1's checksum failed
    w.seg(C1, 40000, S, 80, "A", [DSS(flags="Aa", data_ack=1), MPFail(dsn=7)])  # c1's response (§3.7)
    counters = with_handshake(s1={"DataCsumErr": 1, "MPFailTx": 1, "MPFailRx": 1},
                              c1={"MPFailTx": 1, "MPFailRx": 1})
    got = compare(tmp_path, w, counters)
    assert not disagreements(got.values()), [str(a) for a in disagreements(got.values())]
    s1, c1 = got[("s1", "DataCsumErr")], got[("c1", "DataCsumErr")]
    assert (s1.how, s1.low, s1.high) == (NONZERO, 1, None) and (c1.low, c1.high) == (0, None)
    # The peer answered MP_FAIL, so it owes an infinite mapping the kernel counts when queued.
    assert (got[("c1", "InfiniteMapTx")].low, got[("c1", "InfiniteMapTx")].high) == (0, 1)
    fails = {"MPFailTx": 1, "MPFailRx": 1}
    got = compare(tmp_path, w, with_handshake(s1=fails, c1=fails))
    assert [(a.node, a.counter) for a in disagreements(got.values())] == [("s1", P + "DataCsumErr")]


def test_an_infinite_mapping_after_the_receivers_own_fallback_may_be_counted(tmp_path):
    # Seen in CI: s1 answered a checksum failure with MP_FAIL and ran as plain TCP from then on;
    # c1's infinite mapping came after, and s1's kernel counted it (or may not).
    w = Wire()
    handshake(w, checksum=True)
    w.seg(C1, 40000, S, 80, "PA", [DSS(flags="AaMm", data_ack=1, dsn=1, ssn=1, data_level_length=100,
                                       checksum=0)], payload=b"x" * 100)
    w.seg(S, 80, C1, 40000, "A", [DSS(flags="Aa", data_ack=1), MPFail(dsn=1)])
    w.seg(S, 80, C1, 40000, "PA", payload=b"y" * 50)  # s1 sends bare from here on
    w.seg(C1, 40000, S, 80, "PA", [DSS(flags="AaMm", data_ack=1, dsn=1, ssn=1, data_level_length=0,
                                       checksum=0)], payload=b"x" * 100)
    w.seg(C1, 40000, S, 80, "PA", payload=b"x" * 100)
    base = {"s1": {"DataCsumErr": 1, "MPFailTx": 1}, "c1": {"MPFailRx": 1, "InfiniteMapTx": 1}}
    for read in (0, 1):
        got = compare(tmp_path, w, with_handshake(s1=base["s1"] | {"InfiniteMapRx": read}, c1=base["c1"]))
        rx = got[("s1", "InfiniteMapRx")]
        assert (rx.low, rx.high) == (0, 1) and "fell back" in rx.explanation, str(rx)
        assert not disagreements(got.values()), [str(a) for a in disagreements(got.values())]


def test_without_checksums_no_checksum_can_fail(tmp_path):
    w = Wire()
    handshake(w, checksum=False)
    got = compare(tmp_path, w, with_handshake(s1={"DataCsumErr": 1}))
    bad = disagreements(got.values())
    assert [(a.node, a.counter, a.high) for a in bad] == [("s1", P + "DataCsumErr", 0)]


def test_an_option_repeated_on_a_split_segment_may_be_one_write(tmp_path):
    w = Wire()
    established(w)
    for _ in range(2):  # one GSO segment, cut in two on the wire: MP_PRIO on both halves
        w.seg(S, 80, C1, 40000, "A", [DSS(flags="AaMm", data_ack=1, dsn=1, ssn=1, data_level_length=200),
                                      MPPrio(backup=1)], payload=b"y" * 100)
    got = compare(tmp_path, w, with_handshake(s1={"MPPrioTx": 1}, c1={"MPPrioRx": 2}))
    tx = got[("s1", "MPPrioTx")]
    assert (tx.low, tx.high, tx.how) == (1, 2, RANGE) and tx.agree
    assert got[("c1", "MPPrioRx")].implied == 2  # received: each wire segment is read on its own


def test_routers_and_counters_the_kernel_lacks_are_left_out(tmp_path):
    w = main_transfer()
    caps = w.write(tmp_path)
    router = tmp_path / "r1-eth0.pcap"
    wrpcap(str(router), w.pkts)
    conns = build([caps["c1"][0], caps["s1"][0]])
    available = {P + n for n in (*MAIN_C1, *MAIN_S1)} - {P + "MPPrioTx"}
    got = compare_counters(conns, deltas(c1=MAIN_C1, s1=MAIN_S1), ADDRESSES | {"r1": {"198.18.1.1"}},
                           caps | {"r1": [router]}, available=available)
    assert {a.node for a in got} == {"c1", "s1"}
    assert all(a.counter in available for a in got) and P + "MPPrioRx" in {a.counter for a in got}
    assert not disagreements(got)


def test_node_captures_groups_a_runs_captures_by_node():
    pcaps = {"c1-eth0": Path("a"), "c1-eth1": Path("b"), "r1-eth0": Path("c")}
    interfaces = [("c1", "c1-eth0"), ("r1", "r1-eth0"), ("c1", "c1-eth1"), ("s1", "s1-eth0")]
    assert node_captures(pcaps, interfaces) == {"c1": [Path("a"), Path("b")], "r1": [Path("c")]}


# -- live: the kernel against the wire ------------------------------------------------------------

live = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces)")


def _require(*names: str) -> None:
    from conformance import doctor
    from conformance.errors import CapabilityMissing

    try:
        doctor.require("root", "socket:mptcp", "tcpdump", "mnexec", "ethtool", *names)
    except CapabilityMissing as exc:
        pytest.skip(str(exc))


def _judge(lab, run, nodes=("c1", "s1")) -> dict[tuple[str, str], CounterAgreement]:
    """What the Lab would do after a transfer: model the captures, compare each host's counters."""
    from conformance.endpoints.counters import read_counters
    from conformance.observe.rules import check

    endpoint_intfs = {i for n, i in lab.topo.interfaces() if n in ("c1", "s1")}
    order = sorted(run.pcaps, key=lambda i: (i not in endpoint_intfs, i))
    connections, _ = check([run.pcaps[i] for i in order])
    captures = {n: v for n, v in node_captures(run.pcaps, lab.topo.interfaces()).items() if n in nodes}
    addresses = {n: lab.topo.addresses(n) for n in captures}
    available = read_counters(lab.net["c1"].pid).keys()
    result = compare_counters(connections, run.counters, addresses, captures, available=available)
    (run.folder / "counter-oracle.txt").write_text("\n".join(str(a) for a in result) + "\n")
    return {(a.node, a.counter.removeprefix(P)): a for a in result}


def _assert_all_agree(got: dict, run) -> None:
    bad = disagreements(got.values())
    assert not bad, "\n".join(str(a) for a in bad) + f"\nkernel: {json.dumps(run.counters)[:2000]}"


@live
@pytest.mark.families("ipv4", "ipv6")  # the plugin parametrizes `family`
def test_live_join_and_add_addr_with_retransmissions(tmp_path, family):
    """The server announces its second address, the client echoes and joins it, over a router
    that drops every other SYN/ACK (SYNs are retransmitted), every ADD_ADDR echo (the ADD_ADDR is
    retransmitted each second) and the first MP_JOIN third ACK. Mid-transfer the server flips the
    announced endpoint to backup (MP_PRIO) and then deletes it (REMOVE_ADDR)."""
    _require("nft")
    from conformance.endpoints.linux import EndpointFlags, MptcpConfig, PMEndpoint
    from conformance.lab import MB, Lab
    from conformance.net.cleanup import Cleanup
    from conformance.net.registry import make_topology
    from conformance.proc import run as run_cmd

    with Cleanup() as cleanup:
        lab = Lab(make_topology("two_path_server", family=family, bw=8), tmp_path / "lab", cleanup,
                  family=family)
        announced = lab.addresses("s1")[1]
        lab.configure("s1", MptcpConfig(subflows=2, sysctls={"net.mptcp.add_addr_timeout": "1"}, endpoints=[
            PMEndpoint(announced, EndpointFlags.SIGNAL, dev="s1-eth1", id=1)]))
        lab.configure("c1", MptcpConfig(subflows=2, add_addr_accepted=2))
        # rc-eth0 faces the client. nft reads the first MPTCP option only: the echo travels alone.
        once = "limit rate 1/hour burst 1 packets"
        run_cmd(["nft", "-f", "-"], netns=lab.net.netns("rc"), input=f"""table inet lossy {{
          chain c {{ type filter hook forward priority 0;
            iifname != "rc-eth0" tcp flags & (syn|ack) == syn|ack numgen inc mod 2 == 0 drop
            iifname "rc-eth0" tcp flags & (syn|ack|rst|fin) == ack tcp option mptcp subtype 3 drop
            iifname "rc-eth0" tcp flags & (syn|ack) == ack tcp option mptcp subtype 1 {once} drop
          }}
        }}""")

        def during(port: int) -> None:
            lab.wait_established("c1", port, 2, within=15)  # both subflows up
            # While data still flows (about 2 s at 8 Mbit/s per path): a REMOVE_ADDR sent while
            # the connection closes would not be sent at all.
            time.sleep(0.3)
            run_cmd(["ip", "mptcp", "endpoint", "change", "id", "1", "backup"], netns=lab.net.netns("s1"))
            time.sleep(0.2)
            run_cmd(["ip", "mptcp", "endpoint", "delete", "id", "1"], netns=lab.net.netns("s1"))

        run = lab.transfer(up=4 * MB, down=4 * MB, wait_subflows=2, timeout=60, during=during)
        got = _judge(lab, run)
    _assert_all_agree(got, run)
    # The comparison is about something: the events happened and both sides counted them.
    for node, name, at_least in (("s1", "MPCapableSYNRX", 1), ("c1", "MPCapableSYNACKRX", 1),
                                 ("s1", "MPCapableACKRX", 1), ("c1", "MPJoinSynAckRx", 1),
                                 ("s1", "MPJoinSynRx", 1), ("s1", "MPJoinAckRx", 1), ("c1", "AddAddr", 2),
                                 ("c1", "EchoAddTx", 2), ("s1", "AddAddrTx", 2), ("c1", "MPPrioRx", 1),
                                 ("s1", "MPPrioTx", 1), ("c1", "RmAddr", 1), ("s1", "RmAddrTx", 1)):
        a = got[(node, name)]
        assert a.implied >= at_least and a.kernel == a.implied, str(a)
    assert got[("s1", "EchoAdd")].implied == 0  # every echo was dropped on the way
    # Every other SYN/ACK is dropped (which ones depends on the order they come in), so SYNs go out
    # again, and each subflow still counts once: as many MP_JOIN SYNs counted as distinct join
    # subflows reached s1, whatever the number of SYNs sent.
    from conformance.observe.segments import decode

    joins = [x for intf, pcap in run.pcaps.items() if intf.startswith("s1-") for x in decode(pcap)
             if x.flags & 0x12 == 0x02 and x.mptcp("MP_JOIN")]
    subflows = {(x.src, x.sport) for x in joins}
    assert run.counters["s1"][P + "MPCapableSYNRX"] == 1
    assert run.counters["s1"][P + "MPJoinSynRx"] == len(subflows) <= len(joins), (len(subflows), len(joins))
    run.expect_intact(lab.expect)
    assert all(c.ok for c in lab.expect.checks if "received the peer's" in str(c))


INJECTOR = r"""
import json, random, sys
from scapy.all import IP, TCP, conf, sr1
import conformance.wire
from conformance.wire import MPJoinSyn, MPJoinAck, mptcp_options, crypto
src, dst, gw, dev = sys.argv[1:5]
dport, skey = int(sys.argv[5]), int(sys.argv[6])
conf.verb = 0
conf.route.add(host=dst, gw=gw, dev=dev)
out = {}
for case, token in (("bad_hmac", crypto.token(skey)), ("no_token", crypto.token(skey) ^ 0x5A5A5A5A)):
    sport, isn = random.randrange(20000, 60000), random.randrange(2**32)
    syn = IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags="S", seq=isn, options=[("MSS", 1460),
          MPJoinSyn(address_id=9, receiver_token=token, sender_random=random.randrange(2**32))])
    reply = sr1(syn, iface=dev, timeout=3)
    out[case] = str(reply[TCP].flags) if reply is not None else None
    if case == "bad_hmac" and reply is not None and mptcp_options(reply[TCP]):
        ack = IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags="A", seq=isn + 1, ack=reply[TCP].seq + 1,
                                         options=[MPJoinAck(sender_hmac=bytes(20))])
        answer = sr1(ack, iface=dev, timeout=3)
        out["bad_hmac_ack"] = str(answer[TCP].flags) if answer is not None else None
print(json.dumps(out))
"""

RESPONDER = r"""
import json, random, sys
from scapy.all import Ether, IP, TCP, conf, sniff, sendp
import conformance.wire
from conformance.wire import MPJoinSynAck, mptcp_options
conf.verb = 0
print("listening", flush=True)
def join_syn(p):
    return TCP in p and p[TCP].flags == "S" and any(type(o).__name__ == "MPJoinSyn" for o in mptcp_options(p[TCP]))
got = sniff(iface=sys.argv[1], lfilter=join_syn, count=1, timeout=60)
if got:
    syn = got[0]
    sendp(Ether(src=syn[Ether].dst, dst=syn[Ether].src) / IP(src=syn[IP].dst, dst=syn[IP].src) / TCP(
        sport=syn[TCP].dport, dport=syn[TCP].sport, flags="SA", seq=random.randrange(2**32), ack=syn[TCP].seq + 1,
        options=[("MSS", 1460), MPJoinSynAck(address_id=0, sender_truncated_hmac=random.randrange(2**64),
                                             sender_random=random.randrange(2**32))]), iface=sys.argv[1])
print(json.dumps({"answered": bool(got)}), flush=True)
"""


@live
def test_live_join_hmac_failures_on_both_sides(tmp_path):
    """1. The client kernel's MP_JOIN SYN is stopped at r2 and answered from s1's address by a
    SYN/ACK whose truncated HMAC is wrong: the client must count one SYN/ACK HMAC failure (under
    either name, see HMAC_SUM) and reset the subflow. 2. A user-space injector on the client host
    sends the server an MP_JOIN whose third ACK has a wrong HMAC and one whose token names no
    connection: the server counts an ACK HMAC failure and MPJoinNoTokenFound (the client kernel
    took no part in those, so only the server is judged)."""
    _require()
    from conformance.endpoints.linux import EndpointFlags, MptcpConfig, PMEndpoint
    from conformance.lab import MB, Lab
    from conformance.net.cleanup import Cleanup
    from conformance.net.registry import make_topology
    from conformance.observe.segments import decode
    from conformance.observe.wire import initial_subflow
    from conformance.proc import Background
    from conformance.proc import run as run_cmd

    with Cleanup() as cleanup:
        lab = Lab(make_topology("two_path", bw=8), tmp_path / "synack", cleanup)
        lab.configure("s1", MptcpConfig(subflows=2))
        lab.configure("c1", MptcpConfig(subflows=2, endpoints=[
            PMEndpoint(lab.addresses("c1")[1], EndpointFlags.SUBFLOW, dev="c1-eth1")]))
        run_cmd(["iptables", "-A", "FORWARD", "-i", "r2-eth0", "-p", "tcp", "--syn", "-j", "DROP"],
                netns=lab.net.netns("r2"))
        out = tmp_path / "responder.out"
        responder = Background([sys.executable, "-c", RESPONDER, "r2-eth0"], netns=lab.net.netns("r2"),
                               stdout=out, stderr=tmp_path / "responder.err")
        cleanup.defer("stop the responder", responder.stop)
        deadline = time.monotonic() + 20
        while "listening" not in out.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # from "listening" to the socket being bound
        first = lab.transfer(up=MB, down=MB)
        responder.wait(70)
        assert '"answered": true' in out.read_text(), (tmp_path / "responder.err").read_text()[-800:]
        got = _judge(lab, first)
    _assert_all_agree(got, first)
    both, rst = got[("c1", HMAC_SUM.removeprefix(P))], got[("c1", "MPRstTx")]
    assert (both.implied, both.kernel) == (1, 1) and (rst.implied, rst.kernel) == (1, 1), (str(both), str(rst))
    assert got[("c1", "MPJoinSynAckRx")].kernel == 0 and got[("c1", "MPJoinSynTx")].kernel == 1

    results: dict = {}
    with Cleanup() as cleanup:
        lab = Lab(make_topology("two_path", bw=8), tmp_path / "ack", cleanup)
        lab.configure("s1", MptcpConfig(subflows=4))
        ns = lab.net.netns("c1")
        # No socket of the client's kernel owns the injected subflows: keep it from resetting them.
        run_cmd(["iptables", "-A", "OUTPUT", "-o", "c1-eth1", "-p", "tcp", "--tcp-flags", "RST", "RST", "-j",
                 "DROP"], netns=ns)

        def during(port: int) -> None:
            seen = decode(lab.folder / "s1-eth0.pcap")
            hs = initial_subflow([s for s in seen if port in (s.sport, s.dport)], "s1-eth0")
            server_key = hs.synack.mptcp("MP_CAPABLE")[0].get("sender_key")
            src, dst = lab.addresses("c1")[1], lab.addresses("s1")[0]
            gw = lab.topo.addresses("r2", 4)[0]
            done = run_cmd([sys.executable, "-c", INJECTOR, src, dst, gw, "c1-eth1", str(port), str(server_key)],
                           netns=ns, timeout=30)
            results.update(json.loads(done.stdout.strip().splitlines()[-1]))

        # Long enough (6 s at 8 Mbit/s) that the connection is still up when the injector, which
        # first imports scapy, gets to it, also with other tests running beside this one.
        second = lab.transfer(up=6 * MB, down=6 * MB, during=during)
        got = _judge(lab, second, nodes=("s1",))
    assert results == {"bad_hmac": "SA", "bad_hmac_ack": "R", "no_token": "RA"}, results
    _assert_all_agree(got, second)
    fail, nojoin = got[("s1", "MPJoinAckHMacFailure")], got[("s1", "MPJoinAckRx")]
    assert (fail.implied, fail.kernel) == (1, 1) and (nojoin.high, nojoin.kernel) == (0, 0)
    notoken = got[("s1", "MPJoinNoTokenFound")]
    assert notoken.kernel == 1 and notoken.low == 0 and notoken.high == 1, str(notoken)
    assert got[("s1", "MPJoinSynRx")].kernel == 2 and got[("s1", "MPJoinSynRx")].agree
