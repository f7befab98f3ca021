"""The MPTCP wire format (scapy option layers, bulk decoding) and its cryptography (RFC 8684 §3).

Importing this package teaches scapy's TCP layer to decode and build MPTCP options."""

from conformance.wire.options import (
    DSS,
    AddAddr,
    MPCapable,
    MPExperimental,
    MPFail,
    MPFastclose,
    MPJoinAck,
    MPJoinSyn,
    MPJoinSynAck,
    MPPrio,
    MPTCPMalformed,
    MPTCPOption,
    MPTCPRst,
    MPTCPUnknown,
    RemoveAddr,
    parse_option,
)
from conformance.wire.tcpopts import install, mptcp_options

install()

__all__ = ["DSS", "AddAddr", "MPCapable", "MPExperimental", "MPFail", "MPFastclose", "MPJoinAck", "MPJoinSyn",
           "MPJoinSynAck", "MPPrio", "MPTCPMalformed", "MPTCPOption", "MPTCPRst", "MPTCPUnknown", "RemoveAddr",
           "mptcp_options", "parse_option"]
