"""MPTCP options (TCP option kind 30) as scapy layers: one class per subtype and form (RFC 8684 §3).

Every class is a declaration: the same fields build and dissect. `MPTCPOption(raw)` picks the
class from the subtype nibble and the length (the only things RFC 8684 lets a receiver infer a
form from), so dissection never needs the class up front. Bytes that fit no valid form become an
`MPTCPMalformed` saying what is wrong; an unassigned subtype becomes `MPTCPUnknown`. Neither
ever raises. A `length` left at None is filled in when built; set it to build malformed options.

No protocol state and no cryptography here: see conformance.wire.crypto."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import ClassVar

from scapy.fields import (
    BitEnumField,
    BitField,
    ByteEnumField,
    ByteField,
    ConditionalField,
    Field,
    FieldListField,
    FlagsField,
    ShortField,
    StrField,
    StrLenField,
    XIntField,
    XLongField,
    XShortField,
    XStrFixedLenField,
)
from scapy.packet import Packet

KIND = 30
SUBTYPES = {0: "MP_CAPABLE", 1: "MP_JOIN", 2: "DSS", 3: "ADD_ADDR", 4: "REMOVE_ADDR", 5: "MP_PRIO",
            6: "MP_FAIL", 7: "MP_FASTCLOSE", 8: "MP_TCPRST", 15: "MP_EXPERIMENTAL"}
TCPRST_REASONS = {0: "unspecified", 1: "MPTCP-specific error", 2: "lack of resources",
                  3: "administratively prohibited", 4: "too much outstanding data",
                  5: "unacceptable performance", 6: "middlebox interference"}
# Lengths a receiver can tell the forms apart by (§3.1-§3.7).
MP_CAPABLE_LENGTHS = (4, 12, 20, 22, 24)
ADD_ADDR_LENGTHS = {8: (4, False, False), 10: (4, True, False), 16: (4, False, True), 18: (4, True, True),
                    20: (16, False, False), 22: (16, True, False), 28: (16, False, True),
                    30: (16, True, True)}  # length -> (address bytes, port present, HMAC present)


def dss_length(flags: int, checksum: bool) -> int:
    """§3.3: 4 + Data ACK (4/8 if A) + mapping (DSN 4/8, SSN 4, length 2, checksum 2 if M)."""
    n = 4
    if flags & 0x01:
        n += 8 if flags & 0x02 else 4
    if flags & 0x04:
        n += (8 if flags & 0x08 else 4) + 4 + 2 + (2 if checksum else 0)
    return n


def problem_of(data: bytes) -> str | None:
    """Why these option bytes (starting at kind) fit no valid MPTCP form, or None if they do."""
    if len(data) < 2:
        return f"truncated: {len(data)} byte(s), not even kind and length"
    length = data[1]
    if length < 3:
        return f"length {length} is shorter than kind, length and subtype"
    if length > len(data):
        return f"truncated: length says {length} bytes but only {len(data)} are there"
    subtype = data[2] >> 4
    name = SUBTYPES.get(subtype)
    valid: tuple[int, ...] | None = None
    if subtype == 0:
        valid = MP_CAPABLE_LENGTHS
    elif subtype == 1:
        valid = (12, 16, 24)
    elif subtype == 2:
        if length < 4:
            return f"DSS length {length}: the flags byte is missing"
        base = dss_length(data[3], checksum=False)
        valid = (base, base + 2) if data[3] & 0x04 else (base,)
        if length not in valid:
            return (f"DSS length {length} does not match its flags 0x{data[3]:02x} "
                    f"(expected {' or '.join(map(str, valid))})")
    elif subtype == 3:
        valid = tuple(ADD_ADDR_LENGTHS)
    elif subtype == 4:
        if length < 4:
            return "REMOVE_ADDR lists no address ID"
    elif subtype == 5:
        valid = (3, 4)
    elif subtype in (6, 7):
        valid = (12,)
    elif subtype == 8:
        valid = (4,)
    if valid is not None and length not in valid:
        return f"{name} length {length} is not one of {', '.join(map(str, valid))}"
    return None


class _SizedInt(Field):
    """An unsigned big-endian integer whose width (4 or 8 bytes) another field decides."""

    __slots__ = ["size_from"]

    def __init__(self, name: str, default, size_from: Callable[[Packet], int]):
        super().__init__(name, default, fmt="!Q")
        self.size_from = size_from

    def addfield(self, pkt, s, val):
        return s + int(val or 0).to_bytes(self.size_from(pkt), "big")

    def getfield(self, pkt, s):
        n = self.size_from(pkt)
        return s[n:], int.from_bytes(s[:n], "big")

    def i2repr(self, pkt, x):
        return "None" if x is None else f"{x:#x}"


class _AddrField(Field):
    """ADD_ADDR's address: IPv4 or IPv6, told apart by the option length (or the value, to build)."""

    def __init__(self, name: str, default):
        super().__init__(name, default, fmt="4s")

    def addfield(self, pkt, s, val):
        family = socket.AF_INET6 if ":" in str(val) else socket.AF_INET
        return s + socket.inet_pton(family, str(val))

    def getfield(self, pkt, s):
        size = ADD_ADDR_LENGTHS.get(pkt.length, (4, False, False))[0]
        family = socket.AF_INET6 if size == 16 else socket.AF_INET
        return s[size:], socket.inet_ntop(family, s[:size])


def _present(field: str, min_length: int | None = None, lengths: tuple[int, ...] = ()):
    """A ConditionalField test: dissecting, the length decides; building, whether a value is set."""

    def test(pkt: Packet) -> bool:
        if pkt.length is not None:
            return pkt.length >= min_length if min_length is not None else pkt.length in lengths
        return pkt.getfieldval(field) is not None

    return test


class MPTCPOption(Packet):
    """Any MPTCP option. `MPTCPOption(raw)` dissects into the right subclass."""

    name = "MPTCP"
    subtype_id: ClassVar[int | None] = None
    forms: ClassVar[tuple[int, ...]] = ()  # lengths this class dissects (empty: any)
    _registry: ClassVar[dict[int, list[type[MPTCPOption]]]] = {}
    fields_desc = [ByteField("kind", KIND), ByteField("length", None),
                   BitEnumField("subtype", 0, 4, SUBTYPES), BitField("rest", 0, 4),
                   StrLenField("data", b"", length_from=lambda p: max(0, (p.length or 3) - 3))]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("subtype_id") is not None:
            MPTCPOption._registry.setdefault(cls.subtype_id, []).append(cls)

    @classmethod
    def dispatch_hook(cls, _pkt: bytes | None = None, *args, **kwargs):
        if not _pkt:
            return cls
        if problem_of(_pkt) is not None:
            return MPTCPMalformed
        subtype, length = _pkt[2] >> 4, _pkt[1]
        for candidate in MPTCPOption._registry.get(subtype, ()):
            if not candidate.forms or length in candidate.forms:
                return candidate
        return MPTCPUnknown

    def post_build(self, p: bytes, pay: bytes) -> bytes:
        if self.length is None:
            p = p[:1] + bytes([len(p) & 0xFF]) + p[2:]
        return p + pay

    def extract_padding(self, s: bytes):
        return b"", s  # an option is exactly its bytes; nothing follows it inside

    @property
    def problem(self) -> str | None:
        return None

    def mysummary(self) -> str:
        return f"{SUBTYPES.get(self.subtype, f'subtype {self.subtype}')} len {self.length}"


def _header(subtype: int, nibble: list[Field]) -> list[Field]:
    return [ByteField("kind", KIND), ByteField("length", None), BitEnumField("subtype", subtype, 4, SUBTYPES),
            *nibble]


class MPCapable(MPTCPOption):
    """MP_CAPABLE (§3.1, Figure 4): SYN 4, SYN/ACK 12, third ACK 20, first data 22/24 (v0: 12/12/20)."""

    name = "MP_CAPABLE"
    subtype_id = 0
    fields_desc = [*_header(0, [BitField("version", 1, 4)]),
                   FlagsField("flags", 0x01, 8, "HGFEDCBA"),
                   ConditionalField(XLongField("sender_key", None), _present("sender_key", 12)),
                   ConditionalField(XLongField("receiver_key", None), _present("receiver_key", 20)),
                   ConditionalField(ShortField("data_level_length", None), _present("data_level_length", 22)),
                   ConditionalField(XShortField("checksum", None), _present("checksum", 24))]


class MPJoinSyn(MPTCPOption):
    """MP_JOIN on a SYN (§3.2, Figure 5), length 12."""

    name = "MP_JOIN SYN"
    subtype_id = 1
    forms = (12,)
    fields_desc = [*_header(1, [BitField("reserved", 0, 3), BitField("backup", 0, 1)]),
                   ByteField("address_id", 0), XIntField("receiver_token", 0), XIntField("sender_random", 0)]


class MPJoinSynAck(MPTCPOption):
    """MP_JOIN on a SYN/ACK (§3.2, Figure 6), length 16: leftmost 64 bits of the responder's HMAC."""

    name = "MP_JOIN SYN/ACK"
    subtype_id = 1
    forms = (16,)
    fields_desc = [*_header(1, [BitField("reserved", 0, 3), BitField("backup", 0, 1)]),
                   ByteField("address_id", 0), XLongField("sender_truncated_hmac", 0),
                   XIntField("sender_random", 0)]


class MPJoinAck(MPTCPOption):
    """MP_JOIN on the third ACK (§3.2, Figure 7), length 24: leftmost 160 bits of the initiator's HMAC."""

    name = "MP_JOIN ACK"
    subtype_id = 1
    forms = (24,)
    fields_desc = [*_header(1, [BitField("reserved", 0, 12)]),
                   XStrFixedLenField("sender_hmac", b"\0" * 20, 20)]


def _dss_checksum_present(pkt: Packet) -> bool:
    flags = int(pkt.getfieldval("flags"))
    if not flags & 0x04:
        return False
    if pkt.length is not None:
        return pkt.length == dss_length(flags, checksum=True)
    return pkt.getfieldval("checksum") is not None


class DSS(MPTCPOption):
    """Data Sequence Signal (§3.3, Figure 9). flags: A (Data ACK), a (it is 8 bytes), M (mapping),
    m (DSN is 8 bytes), F (DATA_FIN). A Data-Level Length of 0 is the infinite mapping."""

    name = "DSS"
    subtype_id = 2
    fields_desc = [*_header(2, [BitField("reserved", 0, 7)]),
                   FlagsField("flags", 0, 5, "AaMmF"),
                   ConditionalField(_SizedInt("data_ack", None, lambda p: 8 if p.flags & 0x02 else 4),
                                    lambda p: bool(p.flags & 0x01)),
                   ConditionalField(_SizedInt("dsn", None, lambda p: 8 if p.flags & 0x08 else 4),
                                    lambda p: bool(p.flags & 0x04)),
                   ConditionalField(XIntField("ssn", None), lambda p: bool(p.flags & 0x04)),
                   ConditionalField(ShortField("data_level_length", None), lambda p: bool(p.flags & 0x04)),
                   ConditionalField(XShortField("checksum", None), _dss_checksum_present)]


_WITH_PORT = tuple(k for k, v in ADD_ADDR_LENGTHS.items() if v[1])
_WITH_HMAC = tuple(k for k, v in ADD_ADDR_LENGTHS.items() if v[2])


class AddAddr(MPTCPOption):
    """ADD_ADDR (§3.4.1, Figure 12): IPv4/IPv6, optional port, truncated HMAC unless it is an echo (E=1)."""

    name = "ADD_ADDR"
    subtype_id = 3
    fields_desc = [*_header(3, [BitField("reserved", 0, 3), BitField("echo", 0, 1)]),
                   ByteField("address_id", 0), _AddrField("address", "0.0.0.0"),
                   ConditionalField(ShortField("port", None), _present("port", lengths=_WITH_PORT)),
                   ConditionalField(XLongField("truncated_hmac", None),
                                    _present("truncated_hmac", lengths=_WITH_HMAC))]


class RemoveAddr(MPTCPOption):
    """REMOVE_ADDR (§3.4.2, Figure 13): one or more address IDs."""

    name = "REMOVE_ADDR"
    subtype_id = 4
    fields_desc = [*_header(4, [BitField("reserved", 0, 4)]),
                   FieldListField("address_ids", [], ByteField("", 0), max_count=255,
                                  count_from=lambda p: None if p.length is None else max(0, p.length - 3))]


class MPPrio(MPTCPOption):
    """MP_PRIO (§3.3.8, Figure 11), length 3; RFC 6824's form 4 adds an address ID."""

    name = "MP_PRIO"
    subtype_id = 5
    fields_desc = [*_header(5, [BitField("reserved", 0, 3), BitField("backup", 0, 1)]),
                   ConditionalField(ByteField("address_id", None), _present("address_id", 4))]


class MPFail(MPTCPOption):
    """MP_FAIL (§3.7, Figure 16): the 64-bit DSN where the failed mapping starts."""

    name = "MP_FAIL"
    subtype_id = 6
    fields_desc = [*_header(6, [BitField("reserved", 0, 12)]), XLongField("dsn", 0)]


class MPFastclose(MPTCPOption):
    """MP_FASTCLOSE (§3.5, Figure 14): the receiver's key."""

    name = "MP_FASTCLOSE"
    subtype_id = 7
    fields_desc = [*_header(7, [BitField("reserved", 0, 12)]), XLongField("receiver_key", 0)]


class MPTCPRst(MPTCPOption):
    """MP_TCPRST (§3.6, Figure 15): flags U V W T (T: transient) and a reason code."""

    name = "MP_TCPRST"
    subtype_id = 8
    fields_desc = [*_header(8, [FlagsField("flags", 0, 4, "TWVU")]),
                   ByteEnumField("reason", 0, TCPRST_REASONS)]


class MPExperimental(MPTCPOption):
    """MP_EXPERIMENTAL (§7.2): private use, no format."""

    name = "MP_EXPERIMENTAL"
    subtype_id = 15
    fields_desc = [*_header(15, [BitField("rest", 0, 4)]),
                   StrLenField("data", b"", length_from=lambda p: max(0, (p.length or 3) - 3))]


class MPTCPUnknown(MPTCPOption):
    """An unassigned subtype (0x9-0xe): kept as bytes; a receiver must ignore it."""

    name = "MPTCP unknown subtype"


class MPTCPMalformed(MPTCPOption):
    """Bytes that fit no valid MPTCP option form; `problem` says why. Kept byte for byte in `raw`."""

    name = "MPTCP malformed"
    fields_desc = [StrField("raw", b"")]

    @classmethod
    def dispatch_hook(cls, _pkt: bytes | None = None, *args, **kwargs):
        return cls  # whatever the bytes say, they are kept as they are

    def post_build(self, p: bytes, pay: bytes) -> bytes:
        return p + pay  # what was on the wire: rebuilding must not "fix" the length

    @property
    def length(self) -> int | None:
        return self.raw[1] if len(self.raw) > 1 else None

    @property
    def subtype(self) -> int | None:
        return self.raw[2] >> 4 if len(self.raw) > 2 else None

    @property
    def problem(self) -> str | None:
        return problem_of(self.raw) or "no problem found in these bytes"

    def mysummary(self) -> str:
        return f"malformed MPTCP option: {self.problem}"

    def __repr__(self) -> str:
        return f"<MPTCPMalformed {self.problem}: {self.raw.hex()}>"


ALL_CLASSES: tuple[type[MPTCPOption], ...] = (MPCapable, MPJoinSyn, MPJoinSynAck, MPJoinAck, DSS, AddAddr,
                                              RemoveAddr, MPPrio, MPFail, MPFastclose, MPTCPRst,
                                              MPExperimental)


def parse_option(data: bytes) -> MPTCPOption:
    """Dissect one MPTCP option (bytes from its kind byte on; bytes past its length are not part
    of it); never raises."""
    data = bytes(data)
    if len(data) >= 2 and 3 <= data[1] <= len(data):
        data = data[:data[1]]
    if problem_of(data) is not None:
        return MPTCPMalformed(data)
    try:
        return MPTCPOption(data)
    except Exception:  # hostile bytes must come back as evidence, never as a crash
        return MPTCPMalformed(bytes(data))
