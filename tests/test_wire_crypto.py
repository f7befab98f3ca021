"""RFC 8684 cryptography. The hand-made vectors of shared/rfc/crypto-vectors-unverified.txt are
checked here against our functions; the functions themselves are checked against Linux on live
traffic by the conformance cases (join HMACs, ADD_ADDR HMAC, tokens) and tests/test_wire_oracles.py
(checksums, tshark's expected tokens), which is what makes these vectors trustworthy."""

import ipaddress

import pytest

from conformance.wire import crypto

KEY_A, KEY_B = 0x0102030405060708, 0x1112131415161718
R_A, R_B = 0x01020304, 0x05060708
V4 = ipaddress.ip_address("10.0.2.1").packed


def test_token_and_idsn_vectors():
    assert f"{crypto.token(KEY_A):08x}" == "66840dda"
    assert f"{crypto.idsn(KEY_A):016x}" == "f5a101d3d29d6f72"
    assert f"{crypto.token(KEY_B):08x}" == "ccad45ac"
    assert f"{crypto.idsn(KEY_B):016x}" == "535beea38e087c8e"


def test_join_hmac_vectors_and_key_order():
    full_b = crypto.join_hmac(KEY_B, KEY_A, R_B, R_A)
    assert full_b.hex() == "65ee096833f661d92fc5b27515cbc3b840dd77a5575c1d9c4b4271561ed13849"
    assert crypto.join_synack_hmac(KEY_B, KEY_A, R_B, R_A) == 0x65EE096833F661D9
    full_a = crypto.join_hmac(KEY_A, KEY_B, R_A, R_B)
    assert full_a[:20].hex() == "24bdde08dfc55c9b4185e1b56b2f89db241ac0f2"
    assert crypto.verify_join_synack(0x65EE096833F661D9, KEY_B, KEY_A, R_B, R_A)
    assert crypto.verify_join_ack(full_a[:20], KEY_A, KEY_B, R_A, R_B)
    # Swapping the key order (a classic implementation bug) must not verify.
    assert not crypto.verify_join_synack(0x65EE096833F661D9, KEY_A, KEY_B, R_B, R_A)
    assert not crypto.verify_join_ack(full_a[:20], KEY_B, KEY_A, R_A, R_B)


@pytest.mark.parametrize("port, expected", [(None, 0x014B3007310C639C), (8080, 0xB08C3EB910379895)])
def test_add_addr_hmac_vectors(port, expected):
    assert crypto.add_addr_hmac(KEY_A, KEY_B, 1, V4, port) == expected
    assert crypto.verify_add_addr(expected, KEY_A, KEY_B, 1, V4, port)
    assert not crypto.verify_add_addr(expected, KEY_B, KEY_A, 1, V4, port)


def test_add_addr_hmac_without_port_is_the_zero_port():
    assert crypto.add_addr_hmac(KEY_A, KEY_B, 7, V4, None) == crypto.add_addr_hmac(KEY_A, KEY_B, 7, V4, 0)


def _reference_checksum(words: bytes) -> int:
    """RFC 1071 by the book, independent of the implementation under test."""
    if len(words) % 2:
        words += b"\0"
    total = 0
    for i in range(0, len(words), 2):
        total += (words[i] << 8) | words[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return (~total) & 0xFFFF


@pytest.mark.parametrize("payload", [b"", b"a", b"hello world", bytes(range(256)) * 5 + b"x"])
def test_dss_checksum_is_the_tcp_checksum_of_the_pseudo_header_and_payload(payload):
    dsn, ssn, dll = 0x9E90A079B9B6907E, 1, len(payload)
    header = dsn.to_bytes(8, "big") + ssn.to_bytes(4, "big") + dll.to_bytes(2, "big") + b"\0\0"
    csum = crypto.dss_checksum(dsn, ssn, dll, payload)
    assert csum == _reference_checksum(header + payload)
    assert crypto.dss_checksum_ok(dsn, ssn, dll, payload, csum)
    assert not crypto.dss_checksum_ok(dsn, ssn, dll, payload + b"!", csum)
    assert not crypto.dss_checksum_ok(dsn + 1, ssn, dll, payload, csum)
