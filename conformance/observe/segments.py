"""The TCP segments of a capture with their MPTCP options, decoded by our own codec.

This is what cases and the passive checker judge. It reads captures with the bulk decoder
(conformance.wire.bulk), whose field values are those of our scapy classes; tshark stays a
second, independent oracle (conformance.observe.oracles)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from conformance.errors import InputError
from conformance.wire.bulk import iter_pcap
from conformance.wire.options import SUBTYPES

# Our class names -> the RFC's option names (the forms of one subtype share a name).
_RFC_NAMES = {"MPCapable": "MP_CAPABLE", "MPJoinSyn": "MP_JOIN", "MPJoinSynAck": "MP_JOIN",
              "MPJoinAck": "MP_JOIN", "DSS": "DSS", "AddAddr": "ADD_ADDR", "RemoveAddr": "REMOVE_ADDR",
              "MPPrio": "MP_PRIO", "MPFail": "MP_FAIL", "MPFastclose": "MP_FASTCLOSE", "MPTCPRst": "MP_TCPRST",
              "MPExperimental": "MP_EXPERIMENTAL", "MPTCPUnknown": "unknown subtype",
              "MPTCPMalformed": "malformed"}
_FLAG_NAMES = "FSRPAUECN"
_HEX_FIELDS = {"sender_key", "receiver_key", "receiver_token", "sender_random", "sender_truncated_hmac",
               "data_ack", "dsn", "truncated_hmac", "checksum", "flags"}


@dataclass(frozen=True)
class Option:
    """One MPTCP option as our codec decoded it."""

    cls: str  # our scapy class name (MPCapable, MPJoinSynAck, DSS, MPTCPMalformed, ...)
    fields: dict
    raw: bytes

    @property
    def name(self) -> str:
        return _RFC_NAMES.get(self.cls, self.cls)

    @property
    def length(self) -> int | None:
        return self.raw[1] if len(self.raw) > 1 else None

    def get(self, key: str, default=None):
        return self.fields.get(key, default)

    def __str__(self) -> str:
        shown = []
        for key, value in self.fields.items():
            if key in ("kind", "length", "subtype", "reserved"):
                continue
            if isinstance(value, bytes):
                value = value.hex()
            elif isinstance(value, int) and key in _HEX_FIELDS:
                value = f"{value:#x}"
            shown.append(f"{key}={value}")
        return f"{self.name}(len {self.length}{', ' + ', '.join(shown) if shown else ''})"


@dataclass
class Segment:
    pcap: str
    frame: int
    time: float
    src: str
    dst: str
    sport: int
    dport: int
    flags: int
    seq: int
    ack: int
    payload: int
    stream: int  # connection index in this capture, in order of first appearance
    options: list[Option] = field(default_factory=list)

    @property
    def flag_str(self) -> str:
        return "".join(c for i, c in enumerate(_FLAG_NAMES) if self.flags & (1 << i)) or "."

    def has(self, flag: str) -> bool:
        return bool(self.flags & (1 << _FLAG_NAMES.index(flag)))

    def mptcp(self, name: str) -> list[Option]:
        """The options of RFC name `name` (MP_CAPABLE, MP_JOIN, DSS, ...) or of class name `name`."""
        return [o for o in self.options if name in (o.name, o.cls)]

    def __str__(self) -> str:
        opts = " ".join(str(o) for o in self.options) or "no MPTCP option"
        return (f"{Path(self.pcap).name} frame {self.frame}: {self.src}.{self.sport} > {self.dst}.{self.dport} "
                f"[{self.flag_str}] len {self.payload} {opts}")


@functools.lru_cache(maxsize=64)
def _decode_cached(path: str, mtime: float) -> tuple[Segment, ...]:
    streams: dict[tuple, int] = {}
    out = []
    for p in iter_pcap(path):
        key = tuple(sorted(((p.src, p.sport), (p.dst, p.dport))))
        stream = streams.setdefault(key, len(streams))
        opts = [Option(name, fields, raw) for (name, fields), raw in zip(p.options, p.raw_options, strict=True)]
        out.append(Segment(path, p.frame, p.time, p.src, p.dst, p.sport, p.dport, p.flags, p.seq, p.ack,
                           p.payload_len, stream, opts))
    return tuple(out)


def decode(pcap: Path | str) -> list[Segment]:
    """Every TCP segment of `pcap`, in capture order."""
    path = Path(pcap)
    if not path.is_file():
        raise InputError(f"{path}: no such capture file")
    return list(_decode_cached(str(path.resolve()), path.stat().st_mtime))


assert set(_RFC_NAMES.values()) >= set(SUBTYPES.values())
