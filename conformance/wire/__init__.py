"""The MPTCP wire format and its cryptography (RFC 8684 §3)."""
