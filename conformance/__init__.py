"""mptcp-conformance: RFC 8684 conformance testing on emulated multihomed hosts."""

__version__ = "0.1.0"
__all__ = ["__version__"]
