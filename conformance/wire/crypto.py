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
