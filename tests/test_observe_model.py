"""The connection model on captures our codec writes: keys, joins by token, HMACs, ADD_ADDR,
DATA_FIN, fallback, and one vantage per subflow when several links saw it."""

from __future__ import annotations

import hashlib
import ipaddress

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

from conformance.observe.model import build
from conformance.wire import DSS, AddAddr, MPCapable, MPJoinAck, MPJoinSyn, MPJoinSynAck, crypto

KEY_C, KEY_S = 0x0102030405060708, 0x1112131415161718
R_C, R_S = 0x01020304, 0x05060708
C1, C2, S = "198.18.1.2", "198.18.2.2", "198.19.0.2"


def isn(src, sport, dst, dport) -> int:
    """A fixed, unpredictable-looking ISN per direction, as RFC 6528 would give."""
    return int.from_bytes(hashlib.sha256(f"{src} {sport} {dst} {dport}".encode()).digest()[:4], "big")


def _seg(src, dst, sport, dport, flags, opts, payload=b"", seq=None, ack=None):
    """A segment; by default its sequence number is the direction's ISN (+1 after the SYN) and it
    acknowledges the peer's SYN."""
    if seq is None:
        seq = (isn(src, sport, dst, dport) + ("S" not in flags)) % 2**32
    if ack is None:
        ack = (isn(dst, dport, src, sport) + 1) % 2**32 if "A" in flags else 0
    return Ether() / IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack,
                                                options=opts) / payload


def connection(*, good_hmac: bool = True, mptcp_synack: bool = True) -> list:
    pkts = [
        _seg(C1, S, 40000, 80, "S", [MPCapable(flags="AH")]),
        _seg(S, C1, 80, 40000, "SA", [MPCapable(flags="AH", sender_key=KEY_S)] if mptcp_synack else []),
        _seg(C1, S, 40000, 80, "A", [MPCapable(flags="AH", sender_key=KEY_C, receiver_key=KEY_S)]),
    ]
    if not mptcp_synack:
        return [*pkts[:2], _seg(C1, S, 40000, 80, "A", [])]
    synack_mac = crypto.join_synack_hmac(KEY_S, KEY_C, R_S, R_C)
    ack_mac = crypto.join_hmac(KEY_C, KEY_S, R_C, R_S)[:20]
    if not good_hmac:
        ack_mac = bytes(20)
    addr = ipaddress.ip_address("198.19.9.9")
    add_mac = crypto.add_addr_hmac(KEY_S, KEY_C, 5, addr.packed, None)
    fin = DSS(flags="AaMmF", data_ack=crypto.idsn(KEY_S) + 1, dsn=crypto.idsn(KEY_C) + 1, ssn=1,
              data_level_length=6, checksum=0)
    pkts += [
        _seg(C2, S, 40000, 80, "S", [MPJoinSyn(address_id=1, receiver_token=crypto.token(KEY_S),
                                               sender_random=R_C)]),
        _seg(S, C2, 80, 40000, "SA", [MPJoinSynAck(address_id=0, sender_truncated_hmac=synack_mac,
                                                   sender_random=R_S)]),
        _seg(C2, S, 40000, 80, "A", [MPJoinAck(sender_hmac=ack_mac)]),
        _seg(S, C1, 80, 40000, "A", [AddAddr(address_id=5, address=str(addr), truncated_hmac=add_mac)]),
        _seg(C1, S, 40000, 80, "A", [AddAddr(echo=1, address_id=5, address=str(addr))]),
        _seg(C2, S, 40000, 80, "PA", [fin], payload=b"hello"),
    ]
    return pkts


def test_keys_join_hmacs_add_addr_and_data_fin(tmp_path):
    path = tmp_path / "c.pcap"
    wrpcap(str(path), connection())
    (conn,) = build([path])
    assert conn.version == 1 and conn.keys == [KEY_C, KEY_S] and conn.checksum is True
    assert conn.fallback is None
    initial, join = conn.subflows
    assert initial.initial and initial.established
    assert not join.initial and join.established and join.token == crypto.token(KEY_S)
    assert join.hmac_ok == (True, True)
    assert join.payload == [5, 0] and join.mappings == [1, 0]
    add, echo = conn.events
    assert (add.kind, add.from_initiator, add.hmac_ok, add.address) == ("ADD_ADDR", False, True, "198.19.9.9")
    assert (echo.kind, echo.from_initiator, echo.hmac_ok) == ("echo", True, None)
    assert conn.data_fin[0] is not None and conn.data_fin[0].frame == 9 and conn.data_fin[1] is None
    assert conn.max_data_ack[0] == crypto.idsn(KEY_S) + 1


def test_a_wrong_join_hmac_is_seen(tmp_path):
    path = tmp_path / "bad.pcap"
    wrpcap(str(path), connection(good_hmac=False))
    (conn,) = build([path])
    assert conn.subflows[1].hmac_ok == (True, False)


def test_fallback_when_the_synack_has_no_mp_capable(tmp_path):
    path = tmp_path / "fb.pcap"
    wrpcap(str(path), connection(mptcp_synack=False))
    (conn,) = build([path])
    assert conn.fallback == "the SYN/ACK carries no MP_CAPABLE"
    assert conn.keys == [None, None]


def test_a_subflow_seen_on_two_links_is_read_once(tmp_path):
    pkts = connection()
    a, b = tmp_path / "c1-eth0.pcap", tmp_path / "r1-eth0.pcap"
    wrpcap(str(a), pkts)
    wrpcap(str(b), pkts)
    (conn,) = build([a, b])
    assert len(conn.subflows) == 2
    assert conn.subflows[1].payload == [5, 0]
    assert len(conn.events) == 2
    assert {w.pcap for w in (conn.syn, conn.subflows[1].syn)} == {str(a)}


def test_live_kernel_connection_from_every_link(tmp_path):
    """Kernel to kernel, captured on all ten interfaces: one connection, each byte counted once."""
    import os

    import pytest

    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces)")
    from conformance.endpoints.linux import EndpointFlags, MptcpConfig, PMEndpoint
    from conformance.lab import MB, Lab
    from conformance.net.cleanup import Cleanup
    from conformance.net.registry import make_topology

    with Cleanup() as cleanup:
        lab = Lab(make_topology("two_path_server"), tmp_path / "lab", cleanup)
        announced = lab.addresses("s1")[1]
        lab.configure("s1", MptcpConfig(subflows=2, endpoints=[PMEndpoint(announced, EndpointFlags.SIGNAL,
                                                                          dev="s1-eth1")]))
        lab.configure("c1", MptcpConfig(subflows=2, add_addr_accepted=2))
        run = lab.transfer(up=MB, down=2 * MB, wait_subflows=2)
    conns = [c for c in build(run.pcaps.values()) if c.subflows[0].tuple4[3] == run.port]
    assert len(conns) == 1
    (conn,) = conns
    assert conn.version == 1 and None not in conn.keys and conn.fallback is None
    assert len(conn.subflows) == 2 and all(s.established for s in conn.subflows)
    assert conn.subflows[1].hmac_ok == (True, True)
    assert conn.subflows[1].tuple4[2] == announced
    kinds = {(e.kind, e.hmac_ok) for e in conn.events}
    assert ("ADD_ADDR", True) in kinds and ("echo", None) in kinds
    assert None not in conn.data_fin
    # Every link saw these bytes; each subflow is read from one vantage, so they add up exactly
    # (payload includes retransmissions, hence >=).
    assert sum(s.payload[0] for s in conn.subflows) >= MB
    assert sum(s.payload[1] for s in conn.subflows) >= 2 * MB
    assert sum(s.payload[0] for s in conn.subflows) < 1.2 * MB
