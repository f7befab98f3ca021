"""tshark as a second oracle: our codec and tshark must agree on every MPTCP option of a capture.

A disagreement is reported as such (which frame, which field, both values), never resolved in
favour of either side: one of the two decoders is wrong, and a human has to look."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from conformance.observe import segments as ours
from conformance.observe import tshark


def _int(v: str) -> int:
    return int(v, 0)


def _ip(v: str) -> str:
    return ipaddress.ip_address(v).compressed


def _hexbytes(v: str) -> bytes:
    return bytes.fromhex(v.replace(":", ""))


# tshark field (as conformance.observe.tshark names it) -> (our field, conversion of tshark's text).
FIELD_MAP: dict[str, tuple[str, Callable[[str], object]]] = {
    "version": ("version", _int), "sendkey": ("sender_key", _int), "recvkey": ("receiver_key", _int),
    "datalvllen": ("data_level_length", _int), "checksum": ("checksum", _int),
    "backup.flag": ("backup", _int), "addrid": ("address_id", _int), "recvtok": ("receiver_token", _int),
    "sendrand": ("sender_random", _int), "sendtrunchmac": ("sender_truncated_hmac", _int),
    "sendhmac": ("sender_hmac", _hexbytes), "rawdataack": ("data_ack", _int), "rawdataseqno": ("dsn", _int),
    "subflowseqno": ("ssn", _int), "echo": ("echo", _int), "ipv4": ("address", _ip), "ipv6": ("address", _ip),
    "port": ("port", _int), "addaddrtrunchmac": ("truncated_hmac", _int), "rst_reason": ("reason", _int),
}
# tshark's "flags" is byte 3 for MP_CAPABLE and DSS (our flags), byte 2's low nibble for MP_TCPRST.
_FLAGS_FROM = {"MPCapable": lambda o: o.get("flags"), "DSS": lambda o: o.get("flags"),
               "MPTCPRst": lambda o: o.get("flags")}
_SUBTYPE_OF = {"MPCapable": 0, "MPJoinSyn": 1, "MPJoinSynAck": 1, "MPJoinAck": 1, "DSS": 2, "AddAddr": 3,
               "RemoveAddr": 4, "MPPrio": 5, "MPFail": 6, "MPFastclose": 7, "MPTCPRst": 8, "MPExperimental": 15}


@dataclass(frozen=True)
class Disagreement:
    pcap: str
    frame: int
    what: str
    ours: object
    theirs: object

    def __str__(self) -> str:
        return (f"{Path(self.pcap).name} frame {self.frame}: {self.what}: "
                f"our codec {self.ours!r}, tshark {self.theirs!r}")


@dataclass
class Agreement:
    options: int  # MPTCP options both decoded and compared
    fields: int  # field values compared
    per_subtype: dict[str, int]
    disagreements: list[Disagreement]


def compare(pcap: Path | str, *, most: int = 20) -> Agreement:
    """Compare every MPTCP option of `pcap` between our codec and tshark, field by field."""
    mine = {s.frame: s for s in ours.decode(pcap)}
    theirs = {s.frame: s for s in tshark.decode(Path(pcap))}
    result = Agreement(0, 0, {}, [])

    def differ(frame: int, what: str, a: object, b: object) -> None:
        if len(result.disagreements) < most:
            result.disagreements.append(Disagreement(str(pcap), frame, what, a, b))

    for frame, seg in mine.items():
        other = theirs.get(frame)
        if other is None:
            if seg.options:
                differ(frame, "segment", "decoded", "not decoded")
            continue
        a_opts = [o for o in seg.options if o.cls in _SUBTYPE_OF]
        b_opts = other.options
        if [_SUBTYPE_OF[o.cls] for o in a_opts] != [o.subtype for o in b_opts]:
            differ(frame, "MPTCP subtypes", [o.name for o in a_opts], [o.name for o in b_opts])
            continue
        unique = len({o.subtype for o in b_opts}) == len(b_opts)
        for a, b in zip(a_opts, b_opts, strict=True):
            result.options += 1
            result.per_subtype[a.name] = result.per_subtype.get(a.name, 0) + 1
            result.fields += 1
            if a.length != b.length:
                differ(frame, f"{a.name} length", a.length, b.length)
            if not unique:
                continue  # tshark's flattened fields cannot be attributed option by option here
            for key, values in b.fields.items():
                mapped = FIELD_MAP.get(key)
                if key == "flags" and a.cls in _FLAGS_FROM:
                    mine_v, theirs_v = _FLAGS_FROM[a.cls](a), _int(values[0])
                elif mapped is None:
                    continue
                else:
                    name, conv = mapped
                    if a.cls == "RemoveAddr" and name == "address_id":
                        mine_v, theirs_v = a.get("address_ids"), [conv(v) for v in values]
                    else:
                        mine_v, theirs_v = a.get(name), conv(values[0])
                result.fields += 1
                if mine_v != theirs_v:
                    differ(frame, f"{a.name} {key}", mine_v, theirs_v)
    return result
