"""RFC 8684 cryptography over 64-bit keys: token, IDSN (§3.1) and MP_JOIN HMACs (§3.2)."""

from __future__ import annotations

import hashlib
import hmac


def _key_bytes(key: int) -> bytes:
    return key.to_bytes(8, "big")  # §3.1: hashed in network byte order


def token(key: int) -> int:
    """Most significant 32 bits of SHA-256(key)."""
    return int.from_bytes(hashlib.sha256(_key_bytes(key)).digest()[:4], "big")


def idsn(key: int) -> int:
    """Least significant 64 bits of SHA-256(key)."""
    return int.from_bytes(hashlib.sha256(_key_bytes(key)).digest()[-8:], "big")


def join_hmac(own_key: int, peer_key: int, own_nonce: int, peer_nonce: int) -> bytes:
    """Full HMAC-SHA256 a host sends in MP_JOIN: Key=(own key ‖ peer key), Msg=(own R ‖ peer R)."""
    return hmac.new(_key_bytes(own_key) + _key_bytes(peer_key),
                    own_nonce.to_bytes(4, "big") + peer_nonce.to_bytes(4, "big"), hashlib.sha256).digest()


def join_synack_hmac(own_key: int, peer_key: int, own_nonce: int, peer_nonce: int) -> int:
    """The SYN/ACK carries the leftmost 64 bits of the responder's HMAC."""
    return int.from_bytes(join_hmac(own_key, peer_key, own_nonce, peer_nonce)[:8], "big")


def add_addr_hmac(sender_key: int, receiver_key: int, addr_id: int, address: bytes, port: int | None) -> int:
    """§3.4.1: rightmost 64 bits of HMAC(Key=(sender key ‖ receiver key), Msg=(ID ‖ address ‖ port)),
    with a two-byte zero port when the option carries none."""
    msg = bytes([addr_id]) + address + (port or 0).to_bytes(2, "big")
    digest = hmac.new(_key_bytes(sender_key) + _key_bytes(receiver_key), msg, hashlib.sha256).digest()
    return int.from_bytes(digest[-8:], "big")


def _ones_complement_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def dss_checksum(dsn: int, ssn: int, data_level_length: int, payload: bytes) -> int:
    """§3.3.1: TCP checksum over the pseudo-header (64-bit DSN, relative SSN, data-level length,
    two zero bytes) followed by the mapping's payload."""
    header = dsn.to_bytes(8, "big") + ssn.to_bytes(4, "big") + data_level_length.to_bytes(2, "big") + b"\0\0"
    return ~_ones_complement_sum(header + payload) & 0xFFFF


def dss_checksum_ok(dsn: int, ssn: int, data_level_length: int, payload: bytes, checksum: int) -> bool:
    """A received checksum verifies when the sum with it in the zero slot folds to all ones."""
    header = (dsn.to_bytes(8, "big") + ssn.to_bytes(4, "big") + data_level_length.to_bytes(2, "big")
              + checksum.to_bytes(2, "big"))
    return _ones_complement_sum(header + payload) == 0xFFFF


def verify_join_synack(truncated: int, responder_key: int, initiator_key: int, responder_nonce: int,
                       initiator_nonce: int) -> bool:
    return truncated == join_synack_hmac(responder_key, initiator_key, responder_nonce, initiator_nonce)


def verify_join_ack(hmac20: bytes, initiator_key: int, responder_key: int, initiator_nonce: int,
                    responder_nonce: int) -> bool:
    return hmac.compare_digest(hmac20, join_hmac(initiator_key, responder_key, initiator_nonce,
                                                 responder_nonce)[:20])


def verify_add_addr(truncated: int, sender_key: int, receiver_key: int, addr_id: int, address: bytes,
                    port: int | None) -> bool:
    return truncated == add_addr_hmac(sender_key, receiver_key, addr_id, address, port)
