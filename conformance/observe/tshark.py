"""Decode a capture's TCP segments and MPTCP options with `tshark -T json` (the first oracle;
our own scapy codec joins it later as a second one).

Fields mode (`-e`) keeps tshark fast on bulk captures. It flattens multi-occurrence fields, so
option fields are handed back to the MPTCP option of the subtype that owns them, in order.

Known tshark 4.0 limitation: the DSS checksum is never shown (its dissector wants two bytes more
than the option has), so `checksum` stays absent on DSS here; our codec is the only reader of it."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from conformance.errors import CommandError, InputError
from conformance.proc import run

SUBTYPES = {0: "MP_CAPABLE", 1: "MP_JOIN", 2: "DSS", 3: "ADD_ADDR", 4: "REMOVE_ADDR", 5: "MP_PRIO",
            6: "MP_FAIL", 7: "MP_FASTCLOSE", 8: "MP_TCPRST", 15: "MP_EXPERIMENTAL"}
_P = "tcp.options.mptcp."
# Which subtypes carry each per-option field (tshark names without the common prefix).
_OWNERS: dict[str, tuple[int, ...]] = {
    "version": (0,), "checksumreq.flags": (0,), "extensibility.flag": (0,), "nomoresubflows.flag": (0,),
    "sha256.flag": (0,), "sendkey": (0,), "recvkey": (0, 7), "flags": (0, 1, 2, 5, 8),
    "datalvllen": (0, 2), "checksum": (0, 2),
    "backup.flag": (1, 5), "addrid": (1, 3, 4, 5), "recvtok": (1,), "sendrand": (1,),
    "sendtrunchmac": (1,), "sendhmac": (1,),
    "datafin.flag": (2,), "dseqn8.flag": (2,), "dseqnpresent.flag": (2,), "dataack8.flag": (2,),
    "dataackpresent.flag": (2,), "rawdataack": (2,), "rawdataseqno": (2, 6), "subflowseqno": (2,),
    "echo": (3,), "ipver": (3,), "ipv4": (3,), "ipv6": (3,), "port": (3,), "addaddrtrunchmac": (3,),
    "flag_T.flag": (8,), "rst_reason": (8,),
}
_FRAME_FIELDS = ("frame.number", "frame.time_relative", "ip.src", "ip.dst", "ipv6.src", "ipv6.dst",
                 "tcp.srcport", "tcp.dstport", "tcp.flags", "tcp.seq_raw", "tcp.ack_raw", "tcp.len",
                 "tcp.stream", "tcp.option_kind", "tcp.option_len", f"{_P}subtype", "mptcp.expected_token")
_FLAG_NAMES = "FSRPAUECN"


@dataclass
class MptcpOption:
    subtype: int
    length: int | None
    fields: dict[str, list[str]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return SUBTYPES.get(self.subtype, f"subtype {self.subtype}")

    def get(self, key: str, default: str | None = None) -> str | None:
        values = self.fields.get(key)
        return values[0] if values else default

    def __str__(self) -> str:
        shown = ", ".join(f"{k}={'/'.join(v)}" for k, v in self.fields.items())
        return f"{self.name}(len {self.length}{', ' + shown if shown else ''})"


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
    stream: int
    options: list[MptcpOption]
    expected_token: str | None = None  # tshark's token of the key this segment carries

    @property
    def flag_str(self) -> str:
        return "".join(c for i, c in enumerate(_FLAG_NAMES) if self.flags & (1 << i)) or "."

    def has(self, flag: str) -> bool:
        return bool(self.flags & (1 << _FLAG_NAMES.index(flag)))

    def mptcp(self, name: str) -> list[MptcpOption]:
        return [o for o in self.options if o.name == name]

    def __str__(self) -> str:
        opts = " ".join(str(o) for o in self.options) or "no MPTCP option"
        return (f"{Path(self.pcap).name} frame {self.frame}: {self.src}.{self.sport} > {self.dst}.{self.dport} "
                f"[{self.flag_str}] len {self.payload} {opts}")


def _first(layers: dict, key: str, default: str | None = None) -> str | None:
    v = layers.get(key)
    return v[0] if v else default


def _options(layers: dict) -> list[MptcpOption]:
    kinds = layers.get("tcp.option_kind", [])
    lengths = iter(layers.get("tcp.option_len", []))
    mptcp_lengths = []
    for kind in kinds:
        length = None if kind in ("0", "1") else next(lengths, None)  # EOL/NOP carry no length
        if kind == "30":
            mptcp_lengths.append(int(length) if length is not None else None)
    subtypes = [int(s) for s in layers.get(f"{_P}subtype", [])]
    opts = [MptcpOption(st, mptcp_lengths[i] if i < len(mptcp_lengths) else None)
            for i, st in enumerate(subtypes)]
    for key, owners in _OWNERS.items():
        values = layers.get(_P + key)
        if not values:
            continue
        holders = [o for o in opts if o.subtype in owners]
        if key == "addrid":
            # Hand the IDs out in option order, as many as each option carries: REMOVE_ADDR
            # length-3 of them, v1 MP_PRIO (length 3) none, the others one.
            at = 0
            for o in holders:
                n = (o.length or 3) - 3 if o.subtype == 4 else (0 if o.subtype == 5 and o.length == 3 else 1)
                if n:
                    o.fields[key] = values[at:at + n]
                    at += n
            continue
        if len(holders) == 1:
            holders[0].fields[key] = values
        else:
            for o, v in zip(holders, values, strict=False):
                o.fields[key] = [v]
    return opts


@functools.lru_cache(maxsize=64)
def _decode_cached(path: str, mtime: float) -> tuple[Segment, ...]:
    fields = [*_FRAME_FIELDS, *(_P + k for k in _OWNERS)]
    argv = ["tshark", "-n", "-r", path, "-o", "mptcp.analyze_mptcp:TRUE", "-Y", "tcp", "-T", "json"]
    for f in fields:
        argv += ["-e", f]
    try:
        out = run(argv, timeout=300).stdout
    except CommandError as exc:
        raise InputError(f"{path}: tshark cannot read this capture ({exc.stderr.strip()[:200]})") from None
    segments = []
    for pkt in json.loads(out or "[]"):
        layers = pkt["_source"]["layers"]
        token = _first(layers, "mptcp.expected_token")
        segments.append(Segment(
            pcap=path, frame=int(_first(layers, "frame.number")),
            time=float(_first(layers, "frame.time_relative", "0")),
            src=_first(layers, "ip.src") or _first(layers, "ipv6.src", ""),
            dst=_first(layers, "ip.dst") or _first(layers, "ipv6.dst", ""),
            sport=int(_first(layers, "tcp.srcport", "0")), dport=int(_first(layers, "tcp.dstport", "0")),
            flags=int(_first(layers, "tcp.flags", "0"), 16), seq=int(_first(layers, "tcp.seq_raw", "0")),
            ack=int(_first(layers, "tcp.ack_raw", "0")), payload=int(_first(layers, "tcp.len", "0")),
            stream=int(_first(layers, "tcp.stream", "0")), options=_options(layers),
            expected_token=f"{int(token):08x}" if token else None))
    return tuple(segments)


def decode(pcap: Path) -> list[Segment]:
    """Every TCP segment of `pcap`, in capture order."""
    path = Path(pcap)
    if not path.is_file():
        raise InputError(f"{path}: no such capture file")
    return list(_decode_cached(str(path.resolve()), path.stat().st_mtime))


def token_of(key: int | str) -> str:
    """RFC 8684 §3.2: the token is the most significant 32 bits of SHA-256 over the key."""
    k = int(key, 0) if isinstance(key, str) else key
    return hashlib.sha256(k.to_bytes(8, "big")).hexdigest()[:8]


def tshark_version() -> str:
    return run(["tshark", "--version"]).stdout.splitlines()[0]
