"""Every passive rule on captures our codec writes: one where it must pass, one where it must fail."""

from __future__ import annotations

import pytest
from scapy.utils import wrpcap
from test_observe_model import C1, C2, KEY_C, KEY_S, R_C, R_S, S, _seg, connection

from conformance.observe.rules import FAIL, PASS, check, rule_ids
from conformance.requirements import load_catalogue
from conformance.wire import (
    DSS,
    AddAddr,
    MPCapable,
    MPFastclose,
    MPJoinAck,
    MPJoinSyn,
    MPJoinSynAck,
    MPTCPRst,
    RemoveAddr,
    crypto,
)


def _judge(tmp_path, pkts, name="c.pcap"):
    path = tmp_path / name
    wrpcap(str(path), pkts)
    _, judgments = check([path])
    return judgments


def _outcomes(judgments, rid):
    return {j.outcome for j in judgments if j.rid == rid}


def full_connection() -> list:
    """connection() with what the remaining rules look at: the ADD_ADDR sent again (same
    address), then withdrawn and its ID rebound; a stand-alone DATA_FIN, an MP_FASTCLOSE with the
    peer's key, and a RST with MP_TCPRST."""
    pkts = connection()
    return [*pkts, pkts[6], _seg(S, C1, 80, 40000, "A", [RemoveAddr(address_ids=[5])]),
            _add_addr(5, "198.19.8.8"),
            _seg(C1, S, 40000, 80, "A", [DSS(flags="AaMmF", data_ack=1, dsn=crypto.idsn(KEY_C) + 6, ssn=0,
                                             data_level_length=1, checksum=0)]),
            _seg(C1, S, 40000, 80, "A", [MPFastclose(receiver_key=KEY_S)]),
            _seg(C2, S, 40001, 80, "R", [MPTCPRst(flags="T", reason=1)])]


def test_every_rule_passes_on_a_correct_connection(tmp_path):
    judgments = _judge(tmp_path, full_connection())
    for rid in rule_ids():
        assert _outcomes(judgments, rid) == {PASS}, (rid, [str(j) for j in judgments if j.rid == rid])


def test_rule_ids_are_catalogued_wire_passive_requirements():
    cat = load_catalogue()
    for rid in rule_ids():
        assert rid in cat, rid


def _add_addr(address_id: int, address: str):
    import ipaddress

    mac = crypto.add_addr_hmac(KEY_S, KEY_C, address_id, ipaddress.ip_address(address).packed, None)
    return _seg(S, C1, 80, 40000, "A", [AddAddr(address_id=address_id, address=address, truncated_hmac=mac)])


def _ports(pkt, port):
    pkt = pkt.copy()
    if pkt["TCP"].dport == 80:
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
    "R3.6-07": lambda: [*connection(), _seg(C2, S, 40001, 80, "R", [MPTCPRst(flags="TU", reason=1)])],
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


@pytest.mark.parametrize("rid", sorted(DEFECTS))
def test_rule_fails_on_its_defect(tmp_path, rid):
    judgments = _judge(tmp_path, DEFECTS[rid]())
    failed = [j for j in judgments if j.rid == rid and j.outcome == FAIL]
    assert failed, (rid, [str(j) for j in judgments])
    assert (failed[0].where and "wants" in str(failed[0])) or failed[0].sentence


def test_every_rule_has_a_failing_fixture():
    assert set(DEFECTS) >= rule_ids()


def test_keys_are_still_read_when_a_rule_fails(tmp_path):
    path = tmp_path / "c.pcap"
    wrpcap(str(path), DEFECTS["R3.1-15"]())
    conns, _ = check([path])
    assert conns[0].keys == [KEY_C, KEY_S]
