"""Every passive rule on captures our codec writes: one where it must pass, one where it must fail."""

from __future__ import annotations

import pytest
from scapy.utils import wrpcap
from test_observe_model import C1, C2, KEY_C, KEY_S, R_C, R_S, S, _seg, connection, isn

from conformance.observe.rules import FAIL, PASS, check, rule_ids
from conformance.requirements import load_catalogue
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


def _judge(tmp_path, pkts, name="c.pcap"):
    path = tmp_path / name
    for i, pkt in enumerate(pkts):  # 1 ms apart, in list order, unless a fixture set its own times
        if not getattr(pkt, "fixed_time", False):
            pkt.time = 1_000_000_000 + i / 1000
    wrpcap(str(path), pkts)
    _, judgments = check([path])
    return judgments


def _outcomes(judgments, rid):
    return {j.outcome for j in judgments if j.rid == rid}


def test_a_stand_alone_data_fin_with_a_64_bit_dsn_is_no_data_to_ack_with_64_bits(tmp_path):
    # Seen live: a listener with nothing to send maps its DATA_FIN alone with a 64-bit DSN; Linux
    # goes on Data-ACKing with 32 bits, as it may for a peer that sent no 64-bit-mapped data.
    pkts = [*data_connection(close=False)[:4],
            _s("A", [_dss("AaMmF", ack=IDSN_C + 5, dsn=IDSN_S + 1, ssn=0, dll=1)], acked=4),
            _c("A", [_dss("A", ack=IDSN_S + 2)], sent=4, acked=1)]
    judgments = _judge(tmp_path, pkts)
    assert "fail" not in _outcomes(judgments, "R3.3.2-01"), [str(j) for j in judgments if j.rid == "R3.3.2-01"]
    assert "fail" in _outcomes(_judge(tmp_path, DEFECTS["R3.3.2-01"](), "defect.pcap"), "R3.3.2-01")


def test_a_reset_with_mp_fail_at_close_is_not_judged_as_a_close(tmp_path):
    # Seen live: a checksum failure after the listener's DATA_FIN was Data-ACKed; §3.7 wants the
    # subflow reset with MP_FAIL, which R3.3.3-03/-04 must not count as closing by RST.
    pkts = [*data_connection()[:9], _c("R", [MPFail(dsn=IDSN_C + 5)], sent=9, acked=5)]
    judgments = _judge(tmp_path, pkts)
    for rid in ("R3.3.3-03", "R3.3.3-04"):
        assert "fail" not in _outcomes(judgments, rid), rid
        assert "fail" in _outcomes(_judge(tmp_path, DEFECTS[rid](), "defect.pcap"), rid)


@pytest.mark.parametrize("isn_shift", [0, 12345])
def test_one_connection_seen_on_both_sides_of_a_nat_is_not_key_reuse(tmp_path, isn_shift):
    # Seen live: captures before and after a source NAT show the connection from two addresses
    # and ports, with the same keys and ISNs. Another ISN makes it another connection: key reuse.
    before = connection()
    after = []
    for pkt in connection():
        ip, tcp = pkt["IP"], pkt["TCP"]
        if ip.src == C1:
            ip.src, tcp.sport, tcp.seq = "198.19.9.1", 20000, (tcp.seq + isn_shift) % 2**32
        else:
            ip.dst, tcp.dport, tcp.ack = "198.19.9.1", 20000, (tcp.ack + isn_shift) % 2**32 if tcp.ack else 0
        after.append(pkt)
    judgments = _judge(tmp_path, [p for pair in zip(before, after, strict=True) for p in pair])
    reused = "fail" in _outcomes(judgments, "R3.1-07") or "fail" in _outcomes(judgments, "R3.1-06")
    assert reused == bool(isn_shift), [str(j) for j in judgments if j.rid in ("R3.1-06", "R3.1-07")]


def full_connection() -> list:
    """connection() with what the remaining rules look at: the ADD_ADDR sent again (same
    address), then withdrawn and its ID rebound; a stand-alone DATA_FIN, an MP_FASTCLOSE with the
    peer's key, and a RST with MP_TCPRST."""
    pkts = connection()
    return [*pkts, pkts[6], _seg(S, C1, 80, 40000, "A", [RemoveAddr(address_ids=[5])]),
            _seg(S, C1, 80, 40000, "A", [], ack=2),  # not a duplicate ACK: the next signal starts a new run
            _add_addr(5, "198.19.8.8"),
            _seg(C1, S, 40000, 80, "A", [DSS(flags="AaMmF", data_ack=1, dsn=crypto.idsn(KEY_C) + 6, ssn=0,
                                             data_level_length=1, checksum=0)]),
            _seg(C1, S, 40000, 80, "A", [AddAddr(echo=1, address_id=5, address="198.19.8.8")]),
            _seg(C1, S, 40000, 80, "A", [MPFastclose(receiver_key=KEY_S)]),
            _seg(C2, S, 40000, 80, "R", [MPTCPRst(flags="T", reason=1)])]


def test_every_rule_passes_on_a_correct_connection(tmp_path):
    """Each rule on the capture that exercises it correctly: full_connection() or its own."""
    for rid in sorted(rule_ids()):
        judgments = _judge(tmp_path, PASSES.get(rid, full_connection)())
        assert _outcomes(judgments, rid) == {PASS}, (rid, [str(j) for j in judgments if j.rid == rid])


def test_rule_ids_are_catalogued_wire_passive_requirements():
    cat = load_catalogue()
    for rid in rule_ids():
        assert rid in cat, rid


def _add_addr(address_id: int, address: str):
    import ipaddress

    mac = crypto.add_addr_hmac(KEY_S, KEY_C, address_id, ipaddress.ip_address(address).packed, None)
    return _seg(S, C1, 80, 40000, "A", [AddAddr(address_id=address_id, address=address, truncated_hmac=mac)])


def _ports(pkt, port, *, side="server"):
    """A copy of `pkt` with the server's port 80 (or, side="client", the client's port) changed."""
    pkt = pkt.copy()
    to_server = pkt["TCP"].dport == 80
    if to_server == (side == "server"):
        pkt["TCP"].dport = port
    else:
        pkt["TCP"].sport = port
    return pkt


def _replace(pkts, index, opts):
    pkt = pkts[index].copy()
    pkt["TCP"].options = opts
    pkts[index] = pkt
    return pkts


DEFECTS = {
    "R3.1-01": lambda: _replace(connection(), 0, [MPCapable(version=0, flags="AH")]),
    "R3.1-15": lambda: _replace(connection(), 0, [MPCapable(flags="ABH")]),
    "R3.1-18": lambda: _replace(connection(), 0, [MPCapable(flags="AGH")]),
    "R3.1-19": lambda: _replace(connection(), 0, [MPCapable(flags="A")]),
    "R3.2-02": lambda: _replace(connection(), 3, [MPJoinSyn(reserved=2, address_id=1, sender_random=R_C,
                                                            receiver_token=crypto.token(KEY_S))]),
    "R3.2-06": lambda: _replace(connection(), 5, [MPJoinAck(reserved=0x100, sender_hmac=crypto.join_hmac(
        KEY_C, KEY_S, R_C, R_S)[:20])]),
    "R3.3-01": lambda: [*connection(), _seg(C1, S, 40000, 80, "A", [DSS(reserved=1, flags="A", data_ack=1)])],
    "R3.3.3-01": lambda: [*connection(), _seg(C1, S, 40000, 80, "A", [DSS(flags="AaMmF", data_ack=1, dsn=9,
                                                                         ssn=5, data_level_length=1)])],
    "R3.4.1-10": lambda: _replace(connection(), 6, [AddAddr(reserved=1, address_id=5, address="198.19.9.9",
                                                            truncated_hmac=1)]),
    "R3.4.1-L02": lambda: _replace(connection(), 6, [AddAddr(address_id=5, address="198.19.9.9",
                                                             truncated_hmac=1)]),
    "R3.4.1-L01": lambda: [*connection()[:7], connection()[8],
                           *[_seg(C1, S, 40000, 80, "A", [DSS(flags="A", data_ack=1)]) for _ in range(12)]],
    "R3.2-03": lambda: _replace(connection(), 4, [MPJoinSynAck(sender_truncated_hmac=1, sender_random=R_S)]),
    "R3.6-07": lambda: [*connection(), _seg(C2, S, 40000, 80, "R", [MPTCPRst(flags="TU", reason=1)])],
    "RC.1.1-L01": lambda: [*connection(), _seg(C1, S, 40000, 80, "A", [DSS(flags="AaMm", data_ack=1, dsn=9, ssn=1,
                                                                          data_level_length=4)], payload=b"abcd")],
    "R3.1-34": lambda: _replace(connection(), 8, [DSS(flags="AaMmF", data_ack=1, dsn=5, ssn=1, data_level_length=6,
                                                      checksum=0)]),
    "R3.9.1-02": lambda: [*connection()[:3], *(_ports(p, 81) for p in connection()[3:6])],
    "R3.2-L01": lambda: [*connection(), _seg("198.18.3.2", S, 40002, 80, "S", [MPJoinSyn(
        address_id=1, receiver_token=crypto.token(KEY_S), sender_random=R_C)])],
    "R3.5-L04": lambda: [*connection(), _seg(C1, S, 40000, 80, "A", [MPFastclose(receiver_key=KEY_C)])],
    "R3.4.1-14": lambda: [*connection(), _add_addr(5, "198.19.8.8")],
    "R3.4.1-16": lambda: [*connection(), _add_addr(5, "198.19.8.8")],
    "R3.1-11": lambda: [*connection()[:2], _seg(C1, S, 40000, 80, "A", []),
                        *[_seg(C1, S, 40000, 80, "A", [DSS(flags="A", data_ack=1)]) for _ in range(3)]],
}


def test_every_rule_has_a_failing_fixture():
    assert set(DEFECTS) | MAY_WITHOUT_FAILURE >= rule_ids()
    assert not set(DEFECTS) & MAY_WITHOUT_FAILURE


def test_keys_are_still_read_when_a_rule_fails(tmp_path):
    path = tmp_path / "c.pcap"
    wrpcap(str(path), DEFECTS["R3.1-15"]())
    conns, _ = check([path])
    assert conns[0].keys == [KEY_C, KEY_S]


# -- a connection that moves data both ways and closes: what the stream and close rules look at ----

IDSN_C, IDSN_S = crypto.idsn(KEY_C), crypto.idsn(KEY_S)
ISN_C, ISN_S = isn(C1, 40000, S, 80), isn(S, 80, C1, 40000)


def _c(flags, opts, payload=b"", sent=0, acked=0, **kw):
    """Initiator -> listener on the first subflow; `sent`/`acked`: bytes before this one each way."""
    return _seg(C1, S, 40000, 80, flags, opts, payload, seq=(ISN_C + 1 + sent) % 2**32,
                ack=(ISN_S + 1 + acked) % 2**32, **kw)


def _s(flags, opts, payload=b"", sent=0, acked=0, **kw):
    return _seg(S, C1, 80, 40000, flags, opts, payload, seq=(ISN_S + 1 + sent) % 2**32,
                ack=(ISN_C + 1 + acked) % 2**32, **kw)


def _dss(flags, *, ack=None, dsn=None, ssn=None, dll=None, csum=True):
    kw = {}
    if ack is not None:
        kw["data_ack"] = ack % 2**64 if "a" in flags else ack % 2**32
    if dsn is not None:
        kw.update(dsn=dsn % 2**64 if "m" in flags else dsn % 2**32, ssn=ssn, data_level_length=dll)
        if csum:
            kw["checksum"] = 0
    return DSS(flags=flags, **kw)


def data_connection(*, first_data=None, wide_ack=True, urgent=None, close=True) -> list:
    """4 bytes each way, DATA_FINs Data-ACKed, the subflow closed by FIN both ways."""
    a = "Aa" if wide_ack else "A"
    first = first_data or _c("PA", [MPCapable(flags="AH", sender_key=KEY_C, receiver_key=KEY_S,
                                              data_level_length=4, checksum=0)], b"abcd")
    pkts = [
        _seg(C1, S, 40000, 80, "S", [MPCapable(flags="AH")], seq=ISN_C),
        _seg(S, C1, 80, 40000, "SA", [MPCapable(flags="AH", sender_key=KEY_S)], seq=ISN_S, ack=ISN_C + 1),
        _c("A", [MPCapable(flags="AH", sender_key=KEY_C, receiver_key=KEY_S)]),
        first,
        _s("PA", [_dss(a + "Mm", ack=IDSN_C + 5, dsn=IDSN_S + 1, ssn=1, dll=4)], b"wxyz", acked=4),
        _c("PA" + ("U" if urgent is not None else ""), [_dss(a + "Mm", ack=IDSN_S + 5, dsn=IDSN_C + 5, ssn=5,
                                                           dll=4)], b"efgh", sent=4, acked=4),
        _c("A", [_dss(a + "MmF", ack=IDSN_S + 5, dsn=IDSN_C + 9, ssn=0, dll=1)], sent=8, acked=4),
        _s("A", [_dss(a + "MmF", ack=IDSN_C + 10, dsn=IDSN_S + 5, ssn=0, dll=1)], sent=4, acked=8),
        _c("A", [_dss(a, ack=IDSN_S + 6)], sent=8, acked=4),
    ]
    if urgent is not None:
        pkts[5]["TCP"].urgptr = urgent
    if close:
        pkts += [_c("FA", [_dss(a, ack=IDSN_S + 6)], sent=8, acked=5), _s("FA", [_dss(a, ack=IDSN_C + 10)], sent=5,
                                                                          acked=9),
                 _c("A", [_dss(a, ack=IDSN_S + 6)], sent=9, acked=6)]
    return pkts


def _second_connection(key: int) -> list:
    """Another connection from C1, open at the same time, with initiator key `key`."""
    return [_seg(C1, S, 40002, 80, "S", [MPCapable(flags="AH")]),
            _seg(S, C1, 80, 40002, "SA", [MPCapable(flags="AH", sender_key=KEY_S + 1)]),
            _seg(C1, S, 40002, 80, "A", [MPCapable(flags="AH", sender_key=key, receiver_key=KEY_S + 1)])]


def _with_join_data(rst_opts, *, acked: bool, retransmit: int = 0, fin_after: bool = False) -> list:
    """connection() plus 5 bytes on the join (re-sent `retransmit` times), acknowledged or not,
    then a RST from the initiator with `rst_opts`, and later traffic on the first subflow."""
    pkts = connection()[:6]
    jc, js = isn(C2, 40000, S, 80), isn(S, 80, C2, 40000)
    data = _seg(C2, S, 40000, 80, "PA", [_dss("AaMm", ack=IDSN_S + 1, dsn=IDSN_C + 1, ssn=1, dll=5)], b"hello",
                seq=jc + 1, ack=js + 1)
    pkts += [data] * (1 + retransmit)
    if acked:
        pkts.append(_seg(S, C2, 80, 40000, "A", [_dss("Aa", ack=IDSN_C + 6)], seq=js + 1, ack=jc + 6))
    pkts.append(_seg(C2, S, 40000, 80, "R", rst_opts, seq=jc + 6, ack=js + 1))
    pkts.append(_c("A", [_dss("Aa", ack=IDSN_S + 1)], acked=0))
    return pkts


def _fast_32bit_sender() -> list:
    """600 mappings of 64 KB with 32-bit DSNs over one second: 39 MB/s, fast enough to wrap a
    32-bit DSN within the MSL."""
    pkts = connection()[:3]
    for i in range(600):
        seg = _c("A", [_dss("AaM", ack=IDSN_S + 1, dsn=IDSN_C + 1 + i * 65535, ssn=1 + i * 65535, dll=65535)])
        seg.time, seg.fixed_time = 1_000_000_001 + i / 599, True
        pkts.append(seg)
    return pkts


def _crossed_joins() -> list:
    """Both hosts join the same address pair at once, and both subflows live on."""
    pkts = connection()[:6]
    return [*pkts, _seg(S, C2, 45000, 40000, "S", [MPJoinSyn(address_id=0, receiver_token=crypto.token(KEY_C),
                                                             sender_random=R_S)]),
            _seg(C2, S, 40000, 80, "A", [_dss("Aa", ack=IDSN_S + 1)], seq=isn(C2, 40000, S, 80) + 1)]


def _mp_fail_then_join(first_mapping) -> list:
    """The listener resets the join with MP_FAIL at DSN IDSN_C+1; the initiator opens a new subflow
    whose first mapping is `first_mapping`."""
    pkts = connection()[:6]
    c3 = "198.18.3.2"
    pkts.append(_seg(S, C2, 80, 40000, "R", [MPFail(dsn=IDSN_C + 1)], seq=isn(S, 80, C2, 40000) + 1))
    pkts += [_seg(c3, S, 40000, 80, "S", [MPJoinSyn(address_id=3, receiver_token=crypto.token(KEY_S),
                                                    sender_random=R_C)]),
             _seg(c3, S, 40000, 80, "PA", [first_mapping], b"hello")]
    return pkts


def _infinite_mapping(data_ack_after: bool) -> list:
    """The initiator switches to an infinite mapping; the listener acknowledges that segment."""
    pkts = data_connection(close=False)[:6]
    inf = _c("PA", [_dss("AaMm", ack=IDSN_S + 5, dsn=IDSN_C + 9, ssn=9, dll=0, csum=False)], b"ijkl", sent=8,
             acked=4)
    after = _s("A", [_dss("Aa", ack=IDSN_C + 13)] if data_ack_after else [], sent=4, acked=12)
    return [*pkts, inf, after]


def _window(shrink: bool) -> list:
    pkts = data_connection()
    a = _s("A", [_dss("Aa", ack=IDSN_C + 10)], sent=5, acked=9)
    b = _s("A", [_dss("Aa", ack=IDSN_C + 10)], sent=5, acked=9)
    a["TCP"].window, b["TCP"].window = 9000, 8000 if shrink else 9500
    return [*pkts[:-1], a, b]


def _removal(prio: bool) -> list:
    extra = [_seg(S, C1, 80, 40000, "A", [MPPrio(backup=1)], ack=3)] if prio else []
    return [*connection(), *extra, _seg(S, C1, 80, 40000, "A", [RemoveAddr(address_ids=[5])], ack=4)]


def _rst_reason(reason: int, *, acked: bool) -> list:
    return _with_join_data([MPTCPRst(reason=reason)], acked=acked)


PASSES = {
    "R3.1-07": lambda: [*connection()[:3], *_second_connection(KEY_C + 2**40), *connection()[3:]],
    "R3.1-L01": data_connection, "R3.7-02": data_connection, "R3.3.2-01": data_connection,
    "R3.3.2-05": data_connection, "R3.3.3-03": data_connection, "R3.3.3-04": data_connection,
    "R3.3.3-L02": data_connection, "R3.3.2-L01": data_connection, "R3.3.4-01": lambda: _window(False),
    "R3.3.1-05": lambda: data_connection(urgent=4),
    "R3.3.1-11": lambda: data_connection(first_data=_c("PA", [_dss("AaM", ack=IDSN_S + 1, dsn=IDSN_C + 1, ssn=1,
                                                                   dll=4)], b"abcd")),
    "R3.3.3-05": lambda: _rst_reason(4, acked=False),
    "R3.3.6-04": lambda: _rst_reason(5, acked=True), "R3.3.6-05": lambda: _rst_reason(5, acked=True),
    "R3.4.2-07": lambda: _removal(True),
    "R3.7-14": lambda: _mp_fail_then_join(_dss("AaMm", ack=IDSN_S + 1, dsn=IDSN_C + 1, ssn=1, dll=0, csum=False)),
    "R3.7-16": lambda: _infinite_mapping(False),
    "R3.7-L02": lambda: [*connection(), _seg(S, C2, 80, 40000, "R", [MPFail(dsn=IDSN_C + 1)])],
    "R3.3.2-06": lambda: data_connection()[:6],
}

# A MAY on its own forbids nothing: these rules report that the allowed behaviour was seen.
MAY_WITHOUT_FAILURE = {"R3.3.2-05", "R3.3.1-11", "R3.3.6-04", "R3.4.1-06", "R3.4.2-07"}


def _orphan_join(token: int) -> list:
    return [*connection()[:3], _seg(C2, S, 40000, 80, "S", [MPJoinSyn(address_id=1, receiver_token=token,
                                                                      sender_random=R_C)])]


def _data_from(dsn: int) -> list:
    return [*connection()[:3], _c("PA", [_dss("AaMm", ack=IDSN_S + 1, dsn=dsn, ssn=1, dll=4)], b"abcd")]


def _digest(key: int, order: str = "big") -> bytes:
    import hashlib

    return hashlib.sha256(key.to_bytes(8, order)).digest()


def _three_signals() -> list:
    pkts = connection()
    return [*pkts, pkts[6], _seg(S, C1, 80, 40000, "A", [RemoveAddr(address_ids=[5])]), _add_addr(5, "198.19.9.9")]


DEFECTS.update({
    "R3-02": _three_signals, "R3.4.1-18": _three_signals, "R4-03": _three_signals,
    "R3-04": lambda: [*connection()[:3], _seg(C2, S, 40000, 80, "S", [MPJoinSyn(
        address_id=1, receiver_token=crypto.token(KEY_S), sender_random=R_C)], seq=ISN_C + 7)],
    "R3.1-06": lambda: [_seg(C1, S, 40000, 80, "S", [MPCapable(flags="AH")]),
                        _seg(S, C1, 80, 40000, "SA", [MPCapable(flags="AH", sender_key=KEY_C)]),
                        _seg(C1, S, 40000, 80, "A", [MPCapable(flags="AH", sender_key=KEY_C,
                                                               receiver_key=KEY_C)])],
    "R3.1-07": lambda: [*connection()[:3], *_second_connection(KEY_C), *connection()[3:]],
    "R3.1-14": lambda: _replace(connection(), 0, [MPCapable(flags="H")]),
    "R3.3.1-04": lambda: _replace(_replace(connection(), 0, [MPCapable(flags="H")]), 1,
                                  [MPCapable(flags="H", sender_key=KEY_S)]),
    "R3.1-21": lambda: _orphan_join(int.from_bytes(_digest(KEY_S)[-4:], "big")),
    "R3.1-23": lambda: _orphan_join(int.from_bytes(_digest(KEY_S, "little")[:4], "big")),
    "R3.1-22": lambda: _data_from(IDSN_C + 77),
    "R3.1-24": lambda: _data_from(int.from_bytes(_digest(KEY_C)[:8], "big") + 1),
    "R3.1-L01": lambda: data_connection(first_data=_c("PA", [_dss("AaMm", ack=IDSN_S + 1, dsn=IDSN_C + 1, ssn=1,
                                                                  dll=4)], b"abcd")),
    "R3.7-02": lambda: data_connection(first_data=_c("PA", [], b"abcd")),
    "R3.3.1-01": lambda: [*data_connection()[:6], _c("PA", [_dss("AaMm", ack=IDSN_S + 5, dsn=IDSN_C + 99, ssn=5,
                                                                 dll=4)], b"efgh", sent=4, acked=4)],
    "R3.3.1-05": lambda: data_connection(urgent=2),
    "R3.3.1-13": _fast_32bit_sender,
    "R3.3.1-16": lambda: [*data_connection()[:5], _c("PA", [_dss("AaMm", ack=IDSN_S + 5, dsn=IDSN_C + 5,
                                                                 ssn=5000, dll=4)], b"efgh", sent=4, acked=4)],
    "R3.3.2-01": lambda: data_connection(wide_ack=False),
    "R3.3.2-06": lambda: [*data_connection()[:6], _c("A", [_dss("Aa", ack=IDSN_S + 5)], sent=8, acked=4)],
    "R3.3.2-L01": lambda: [*data_connection()[:8], _c("A", [_dss("Aa", ack=IDSN_S + 60)], sent=8, acked=4)],
    "R3.3.3-03": lambda: [*data_connection()[:9], _c("R", [], sent=9, acked=5)],
    "R3.3.3-04": lambda: [*data_connection()[:9], _c("R", [], sent=9, acked=5)],
    "R3.3.3-L02": lambda: [*data_connection()[:7], _c("FA", [], sent=8, acked=4), _s("FA", [], sent=4, acked=9)],
    "R3.3.3-05": lambda: _rst_reason(4, acked=True),
    "R3.3.4-01": lambda: _window(True),
    "R3.3.6-05": lambda: _with_join_data([MPTCPRst(reason=1)], acked=False, retransmit=3),
    "R3.4.1-02": lambda: [*connection(), _seg(C1, S, 40000, 80, "A", [AddAddr(address_id=1,
                                                                          address="198.18.7.7")])],
    "R3.6-01": lambda: [*connection(), _seg(C2, S, 40000, 80, "A", [MPTCPRst(reason=1)])],
    "R3.7-14": lambda: _mp_fail_then_join(_dss("AaMm", ack=IDSN_S + 1, dsn=IDSN_C + 1, ssn=1, dll=5)),
    "R3.7-16": lambda: _infinite_mapping(True),
    "R3.7-L02": lambda: [*connection(), _seg(S, C2, 80, 40000, "R", [(30, b"\x60\x00\x00\x00\x00\x01")])],
    "R3.9.1-01": lambda: [*connection()[:3], *(_ports(p, 40001, side="client") for p in connection()[3:6])],
    "R3.9.1-03": lambda: [*connection()[:3], *(_ports(p, 40001, side="client") for p in connection()[3:6])],
    "R3.9.2-03": _crossed_joins,
})


def test_a_data_fin_takes_no_subflow_sequence_space(tmp_path):
    """A mapping with DATA_FIN covers its payload only at subflow level: data re-sent on the same
    subflow right after it (a reinjection, with another DSN) does not overlap it."""
    pkts = data_connection(close=False)[:6]
    fin = _c("PA", [_dss("AaMmF", ack=IDSN_S + 5, dsn=IDSN_C + 9, ssn=9, dll=5)], b"ijkl", sent=8, acked=4)
    again = _c("PA", [_dss("AaMm", ack=IDSN_S + 5, dsn=IDSN_C + 1, ssn=13, dll=4)], b"abcd", sent=12, acked=4)
    judgments = _judge(tmp_path, [*pkts, fin, again])
    assert _outcomes(judgments, "R3.3.1-01") == {PASS}, [str(j) for j in judgments if j.rid == "R3.3.1-01"]


def test_a_side_that_stops_speaking_mptcp_fell_back_and_is_not_judged_as_mptcp(tmp_path):
    """Options stripped on the way (§3.7): the capture nearest the listener shows its SYN/ACK with
    MP_CAPABLE, but the initiator (which never got it) answers and sends data with no MPTCP option
    at all, and never speaks MPTCP again. That is a fallback, not an R3.1-11 or R3.7-02 failure."""
    pkts = [*connection()[:2], _c("A", []), _c("PA", [], b"abcd"), _s("A", [], acked=4),
            _c("PA", [], b"efgh", sent=4)]
    path = tmp_path / "fb.pcap"
    _judge(tmp_path, pkts, "fb.pcap")
    conns, judgments = check([path])
    assert conns[0].fallback and "initiator sends no MPTCP option" in conns[0].fallback
    assert not [str(j) for j in judgments if j.outcome == FAIL]


def _withdrawn(then: list) -> list:
    """connection() whose initiator withdraws the join's address (ID 1) with REMOVE_ADDR, then `then`."""
    return [*connection(), _seg(C1, S, 40000, 80, "A", [RemoveAddr(address_ids=[1])], ack=5), *then]


def _late(pkt, seconds: float):
    pkt.time, pkt.fixed_time = 1_000_000_000 + seconds, True
    return pkt


PASSES.update({
    "R3.4.2-09": lambda: _withdrawn([_seg(C2, S, 40000, 80, "R", [])]),
    "R3.4.2-10": lambda: _withdrawn([_seg(C2, S, 40000, 80, "R", [])]),
})
DEFECTS.update({
    "R3.4.2-09": lambda: _withdrawn([_seg(C2, S, 40000, 80, "FA", []), _seg(S, C2, 80, 40000, "FA", [])]),
    "R3.4.2-10": lambda: _withdrawn([_late(_seg(C2, S, 40000, 80, "PA", [_dss("Aa", ack=IDSN_S + 1)], b"late"),
                                           5.0)]),
})


@pytest.mark.parametrize("rid", sorted(DEFECTS))
def test_rule_fails_on_its_defect(tmp_path, rid):
    judgments = _judge(tmp_path, DEFECTS[rid]())
    failed = [j for j in judgments if j.rid == rid and j.outcome == FAIL]
    assert failed, (rid, [str(j) for j in judgments])
    assert (failed[0].where and "wants" in str(failed[0])) or failed[0].sentence


def test_a_reset_naming_an_error_is_not_judged_as_a_close(tmp_path):
    """A RST whose MP_TCPRST names an error (§3.6: here "MPTCP-specific error") ends a broken
    subflow; the closing rules (R3.3.3-03/-04) judge only resets that may be a way of closing:
    without MP_TCPRST or with reason "unspecified"."""
    base = data_connection()[:9]
    for reason, judged in ((1, False), (6, False), (0, True)):
        judgments = _judge(tmp_path, [*base, _c("R", [MPTCPRst(reason=reason)], sent=9, acked=5)])
        for rid in ("R3.3.3-03", "R3.3.3-04"):
            assert (FAIL in _outcomes(judgments, rid)) is judged, (reason, rid)
