"""Fast MPTCP decoding of whole captures, without scapy's dissection (the passive checker's reader).

`iter_pcap(path)` reads classic pcap (µs and ns, either byte order) and pcapng, link types
Ethernet (with 802.1Q/802.1ad tags), raw IP, IPv4, IPv6, Linux cooked SLL and SLL2, BSD null
and loopback; it parses IPv4 and IPv6 (skipping hop-by-hop, routing, destination-options and
AH headers; non-first fragments are not TCP) and the TCP header with `struct`, and yields one
`Packet` per TCP segment; frames with truncated headers are skipped and counted (`PcapStats`,
`pcap_stats`), a broken file is one InputError naming it and the byte offset. Option bytes are
only walked when a kind-30 byte is in them at all, and MPTCP options are only decoded into
fields when `Packet.options` is first read.

`decode_option(raw)` gives, for any bytes, the same class name and field values as our scapy
classes (`conformance.wire.options`) give for `parse_option(raw)`, as `scapy_fields()` converts
them: tests/test_wire_bulk.py checks that on built, random, mutated and captured options.
Validity is `problem_of`'s, so an option is malformed here exactly when it is malformed there."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from scapy.config import conf as scapy_conf
from scapy.fields import ConditionalField, FlagValue

from conformance.errors import InputError
from conformance.wire.options import (
    ADD_ADDR_LENGTHS,
    KIND,
    MP_CAPABLE_LENGTHS,
    MPTCPMalformed,
    RemoveAddr,
    dss_length,
    problem_of,
)

__all__ = ["Packet", "PcapStats", "decode_option", "iter_pcap", "pcap_stats", "scapy_fields"]

# ---------------------------------------------------------------------------------------------
# MPTCP options
# ---------------------------------------------------------------------------------------------

_inet_ntop = socket.inet_ntop
_AF_INET, _AF_INET6 = socket.AF_INET, socket.AF_INET6


def _plan(fmt: str, *names: str) -> tuple[struct.Struct, tuple[str, ...]]:
    return struct.Struct("!" + fmt), names


# MP_CAPABLE by length: what follows the flags byte (§3.1).
_MPC = {4: None, 12: _plan("Q", "sender_key"), 20: _plan("QQ", "sender_key", "receiver_key"),
        22: _plan("QQH", "sender_key", "receiver_key", "data_level_length"),
        24: _plan("QQHH", "sender_key", "receiver_key", "data_level_length", "checksum")}
assert tuple(_MPC) == MP_CAPABLE_LENGTHS


def _dss_decoders() -> dict[int, Callable[[bytes], tuple[str, dict]]]:
    """(flags & 0x0f) << 8 | length -> the decoder of that DSS form, for every valid form.

    Each decoder is generated: one struct unpack of the whole option and one dict display, about
    twice as fast as filling the dict field by field; DSS is nearly every option of a capture."""
    decoders = {}
    for f in range(16):
        fmt, names = "", []
        if f & 0x01:
            fmt += "Q" if f & 0x02 else "I"
            names.append("data_ack")
        if f & 0x04:
            fmt += ("Q" if f & 0x08 else "I") + "IH"
            names += ["dsn", "ssn", "data_level_length"]
        forms = [(dss_length(f, False), fmt, names)]
        if f & 0x04:
            forms.append((dss_length(f, True), fmt + "H", [*names, "checksum"]))
        for length, fm, nm in forms:
            values = [f"v{i}" for i in range(len(nm))]
            src = ("def decode(raw, unpack=unpack):\n"
                   f"    kind, length, b2, b3{''.join(', ' + v for v in values)} = unpack(raw)\n"
                   "    return 'DSS', {'kind': kind, 'length': length, 'subtype': 2, "
                   "'reserved': (b2 & 15) << 3 | b3 >> 5, 'flags': b3 & 31"
                   + "".join(f", {n!r}: {v}" for n, v in zip(nm, values, strict=True)) + "}\n")
            namespace = {"unpack": struct.Struct("!BBBB" + fm).unpack_from}
            exec(src, namespace)
            decoders[f << 8 | length] = namespace["decode"]
    return decoders


_DSS = _dss_decoders()
# ADD_ADDR by length: address family, then (port, truncated HMAC) as present (§3.4.1).
_ADD_ADDR = {}
for _len, (_size, _port, _hmac) in ADD_ADDR_LENGTHS.items():
    _fmt = ("H" if _port else "") + ("Q" if _hmac else "")
    _names = (("port",) if _port else ()) + (("truncated_hmac",) if _hmac else ())
    _ADD_ADDR[_len] = (_size, _AF_INET6 if _size == 16 else _AF_INET, 4 + _size,
                       _plan(_fmt, *_names) if _names else None)
_REMOVE_ADDR_IDS = next(f for f in RemoveAddr.fields_desc if f.name == "address_ids")
_JOIN_SYN = struct.Struct("!II")
_JOIN_SYNACK = struct.Struct("!QI")
_Q = struct.Struct("!Q")


def _malformed(raw: bytes) -> tuple[str, dict]:
    return "MPTCPMalformed", {"kind": raw[0] if raw else None, "length": raw[1] if len(raw) > 1 else None,
                              "data": raw[2:], "problem": problem_of(raw) or "no problem found in these bytes"}


def _mp_capable(raw: bytes, length: int) -> tuple[str, dict]:
    if length not in _MPC:
        return _malformed(raw)
    d = {"kind": raw[0], "length": length, "subtype": 0, "version": raw[2] & 15, "flags": raw[3]}
    plan = _MPC[length]
    if plan is not None:
        d.update(zip(plan[1], plan[0].unpack_from(raw, 4), strict=True))
    return "MPCapable", d


def _mp_join(raw: bytes, length: int) -> tuple[str, dict]:
    b2 = raw[2]
    if length == 12:
        token, rand = _JOIN_SYN.unpack_from(raw, 4)
        return "MPJoinSyn", {"kind": raw[0], "length": 12, "subtype": 1, "reserved": b2 >> 1 & 7,
                             "backup": b2 & 1, "address_id": raw[3], "receiver_token": token,
                             "sender_random": rand}
    if length == 16:
        hmac, rand = _JOIN_SYNACK.unpack_from(raw, 4)
        return "MPJoinSynAck", {"kind": raw[0], "length": 16, "subtype": 1, "reserved": b2 >> 1 & 7,
                                "backup": b2 & 1, "address_id": raw[3], "sender_truncated_hmac": hmac,
                                "sender_random": rand}
    if length == 24:
        return "MPJoinAck", {"kind": raw[0], "length": 24, "subtype": 1, "reserved": (b2 & 15) << 8 | raw[3],
                             "sender_hmac": raw[4:24]}
    return _malformed(raw)


def _dss(raw: bytes, length: int) -> tuple[str, dict]:
    decode = _DSS.get((raw[3] & 15) << 8 | length) if length >= 4 else None
    return _malformed(raw) if decode is None else decode(raw)


def _add_addr(raw: bytes, length: int) -> tuple[str, dict]:
    form = _ADD_ADDR.get(length)
    if form is None:
        return _malformed(raw)
    _, family, end, plan = form
    b2 = raw[2]
    d = {"kind": raw[0], "length": length, "subtype": 3, "reserved": b2 >> 1 & 7, "echo": b2 & 1,
         "address_id": raw[3], "address": _inet_ntop(family, raw[4:end])}
    if plan is not None:
        d.update(zip(plan[1], plan[0].unpack_from(raw, end), strict=True))
    return "AddAddr", d


def _remove_addr(raw: bytes, length: int) -> tuple[str, dict]:
    # scapy refuses lists longer than a limit (conf.max_list_count, 100): parse_option then keeps
    # the bytes as malformed although problem_of finds nothing wrong. Only in raw bytes: a TCP
    # header has 40 bytes of options at most.
    if length < 4 or length - 3 > (_REMOVE_ADDR_IDS.max_count or scapy_conf.max_list_count):
        return _malformed(raw)
    return "RemoveAddr", {"kind": raw[0], "length": length, "subtype": 4, "reserved": raw[2] & 15,
                          "address_ids": list(raw[3:length])}


def _mp_prio(raw: bytes, length: int) -> tuple[str, dict]:
    if length not in (3, 4):
        return _malformed(raw)
    b2 = raw[2]
    d = {"kind": raw[0], "length": length, "subtype": 5, "reserved": b2 >> 1 & 7, "backup": b2 & 1}
    if length == 4:
        d["address_id"] = raw[3]
    return "MPPrio", d


def _mp_fail(raw: bytes, length: int) -> tuple[str, dict]:
    if length != 12:
        return _malformed(raw)
    return "MPFail", {"kind": raw[0], "length": 12, "subtype": 6, "reserved": (raw[2] & 15) << 8 | raw[3],
                      "dsn": _Q.unpack_from(raw, 4)[0]}


def _mp_fastclose(raw: bytes, length: int) -> tuple[str, dict]:
    if length != 12:
        return _malformed(raw)
    return "MPFastclose", {"kind": raw[0], "length": 12, "subtype": 7,
                           "reserved": (raw[2] & 15) << 8 | raw[3], "receiver_key": _Q.unpack_from(raw, 4)[0]}


def _mp_tcprst(raw: bytes, length: int) -> tuple[str, dict]:
    if length != 4:
        return _malformed(raw)
    return "MPTCPRst", {"kind": raw[0], "length": 4, "subtype": 8, "flags": raw[2] & 15, "reason": raw[3]}


def _opaque(name: str):
    def decode(raw: bytes, length: int) -> tuple[str, dict]:
        return name, {"kind": raw[0], "length": length, "subtype": raw[2] >> 4, "rest": raw[2] & 15,
                      "data": raw[3:length]}

    return decode


_BY_SUBTYPE = (_mp_capable, _mp_join, _dss, _add_addr, _remove_addr, _mp_prio, _mp_fail, _mp_fastclose,
               _mp_tcprst, *[_opaque("MPTCPUnknown")] * 6, _opaque("MPExperimental"))


def _decode(raw: bytes) -> tuple[str, dict]:
    """decode_option for bytes (no conversion, no guard)."""
    n = len(raw)
    if n < 3 or raw[1] < 3 or raw[1] > n:
        return _malformed(raw)
    length = raw[1]
    if length < n:  # bytes past the option's length are not part of it (as in parse_option)
        raw = raw[:length]
    subtype = raw[2] >> 4
    if subtype == 2 and length >= 4:  # the hot path: DSS
        decode = _DSS.get((raw[3] & 15) << 8 | length)
        return _malformed(raw) if decode is None else decode(raw)
    return _BY_SUBTYPE[subtype](raw, length)


def decode_option(raw: bytes) -> tuple[str, dict]:
    """(scapy class name, fields) of one MPTCP option (bytes from its kind byte on), exactly as
    `scapy_fields(parse_option(raw))` gives them: `MPTCPOption(raw)`'s class and fields, except
    that bytes past the option's length are not part of it (parse_option cuts them, so a
    malformed option's data ends at its length, and b"" is malformed). Never raises."""
    try:
        data = bytes(raw)
    except Exception:  # not even bytes-like: nothing to dissect
        data = b""
    try:
        return _decode(data)
    except Exception:  # like parse_option: hostile bytes come back as evidence
        return _malformed(data)


def scapy_fields(opt) -> dict:
    """The fields of a dissected scapy option as plain values: what decode_option returns.

    Conditional fields that are absent are left out; flags become ints, lists are copied. For
    MPTCPMalformed (whose one field is `raw`): kind and length (None where the bytes end before
    them), data (every byte after the length byte) and the problem."""
    if isinstance(opt, MPTCPMalformed):
        raw = bytes(opt.raw)
        return {"kind": raw[0] if raw else None, "length": opt.length, "data": raw[2:], "problem": opt.problem}
    out = {}
    for f in opt.fields_desc:
        if isinstance(f, ConditionalField) and not f._evalcond(opt):
            continue
        value = opt.getfieldval(f.name)
        if isinstance(value, FlagValue):
            value = int(value)
        elif isinstance(value, list):
            value = list(value)
        out[f.name] = value
    return out


# ---------------------------------------------------------------------------------------------
# Packets
# ---------------------------------------------------------------------------------------------

class Packet:
    """One TCP segment of a capture. `flags` is the 12 bits after TCP's data offset (tshark's
    tcp.flags: FIN 0x001 ... CWR 0x080, AE/NS 0x100, reserved 0xe00). `payload_len` is the TCP
    payload length the IP header says (not what the snaplen kept). `raw_options` holds each MPTCP
    option's bytes in order; `options` their (class name, fields) from decode_option, decoded on
    first access."""

    __slots__ = ("_options", "ack", "dport", "dst", "flags", "frame", "ip_version", "payload_len",
                 "raw_options", "seq", "sport", "src", "time", "urgent", "window", "wscale")

    def __init__(self, frame: int, time: float, src: str, dst: str, sport: int, dport: int, flags: int,
                 seq: int, ack: int, payload_len: int, ip_version: int, raw_options: list[bytes],
                 window: int = 0, urgent: int = 0, wscale: int | None = None):
        self.frame, self.time, self.src, self.dst, self.sport, self.dport = frame, time, src, dst, sport, dport
        self.flags, self.seq, self.ack, self.payload_len = flags, seq, ack, payload_len
        self.ip_version, self.raw_options, self._options = ip_version, raw_options, None
        # window: the raw 16-bit field; wscale: the SYN's Window Scale shift (None: not a SYN or none)
        self.window, self.urgent, self.wscale = window, urgent, wscale

    @property
    def options(self) -> list[tuple[str, dict]]:
        opts = self._options
        if opts is None:
            try:
                get = _DECODED.get
                opts = [get(r) or _remember(r) for r in self.raw_options]
            except Exception:  # hostile bytes come back as evidence, one option at a time
                opts = [_decode_safe(r) for r in self.raw_options]
            self._options = opts
        return opts

    def __repr__(self) -> str:
        return (f"<Packet {self.frame} t={self.time:.6f} {self.src}.{self.sport} > {self.dst}.{self.dport} "
                f"flags={self.flags:#05x} seq={self.seq} ack={self.ack} len={self.payload_len} "
                f"mptcp={[n for n, _ in self.options]}>")


# Bulk transfers repeat option bytes (one DSS on every segment of a mapping): decode each distinct
# option once. The (name, fields) pairs are shared between packets, so they are read-only.
_DECODED: dict[bytes, tuple[str, dict]] = {}
_DECODED_MAX = 4096


def _remember(raw: bytes) -> tuple[str, dict]:
    if len(_DECODED) >= _DECODED_MAX:
        _DECODED.clear()
    out = _DECODED[raw] = _decode(raw)
    return out


def _decode_safe(raw: bytes) -> tuple[str, dict]:
    try:
        return _decode(raw)
    except Exception:
        return _malformed(raw)


@dataclass
class PcapStats:
    """What a pass over a capture saw (filled as iter_pcap runs; final when it is exhausted)."""

    format: str = ""  # "pcap" or "pcapng"
    frames: int = 0  # every record, TCP or not
    tcp: int = 0  # packets yielded
    not_tcp: int = 0  # other protocols and link types with no IP
    fragments: int = 0  # non-first IP fragments (no TCP header in them)
    malformed: int = 0  # truncated or inconsistent L2/IP/TCP headers: skipped
    mptcp_options: int = 0  # MPTCP options found (raw_options)


_NOT_TCP, _FRAGMENT, _MALFORMED = 1, 2, 3

# Link types (https://www.tcpdump.org/linktypes.html) -> how to find the network layer.
_LT_NULL, _LT_ETHERNET, _LT_RAW, _LT_RAW_OLD, _LT_LOOP, _LT_SLL, _LT_IPV4, _LT_IPV6, _LT_SLL2 = (
    0, 1, 101, 12, 108, 113, 228, 229, 276)
_LINKTYPES = {_LT_NULL: "null", _LT_ETHERNET: "Ethernet", _LT_RAW: "raw IP", _LT_RAW_OLD: "raw IP",
              _LT_LOOP: "loop", _LT_SLL: "Linux cooked (SLL)", _LT_IPV4: "IPv4", _LT_IPV6: "IPv6",
              _LT_SLL2: "Linux cooked v2 (SLL2)"}
_VLAN = (0x8100, 0x88A8, 0x9100)
_IP4 = struct.Struct("!HHHBBHII")  # total length, id, frag, ttl, proto, csum, src, dst (from byte 2)
_TCP = struct.Struct("!HHIIBBHxxH")
_H = struct.Struct("!H")
_V6_EXT = frozenset((0, 43, 60))  # hop-by-hop, routing, destination options: (len + 1) * 8 bytes


_V4: dict[int, str] = {}  # address -> its text, for the few addresses a capture holds
_V6: dict[bytes, str] = {}


def _ipv4_str(addr: int) -> str:
    if len(_V4) > 65536:
        _V4.clear()
    s = _V4[addr] = f"{addr >> 24}.{addr >> 16 & 255}.{addr >> 8 & 255}.{addr & 255}"
    return s


def _ipv6_str(addr: bytes) -> str:
    if len(_V6) > 65536:
        _V6.clear()
    s = _V6[addr] = _inet_ntop(_AF_INET6, addr)
    return s


_NOP_NOP_TS = b"\x01\x01\x08\x0a"


def _wscale(opts: bytes) -> int | None:
    """The shift of a SYN's Window Scale option (kind 3), or None."""
    i, n = 0, len(opts)
    while i < n:
        kind = opts[i]
        if kind == 0:
            return None
        if kind == 1:
            i += 1
            continue
        if i + 1 >= n or opts[i + 1] < 2:
            return None
        if kind == 3 and opts[i + 1] == 3 and i + 2 < n:
            return opts[i + 2]
        i += opts[i + 1]
    return None


def _mptcp_chunks(opts: bytes) -> list[bytes]:
    """The kind-30 options among TCP option bytes, cut the way conformance.wire.tcpopts does."""
    n = len(opts)
    i = 0
    if opts[:4] == _NOP_NOP_TS:  # Linux's usual start: NOP, NOP, Timestamps (10 bytes) ...
        i = 12
        if n > 13 and opts[12] == KIND and opts[13] == n - 12:  # ... then one MPTCP option to the end
            return [opts[12:]]
    out = []
    while i < n:
        kind = opts[i]
        if kind == 0:  # EOL: the rest is padding
            break
        if kind == 1:
            i += 1
            continue
        length = opts[i + 1] if i + 1 < n else 0
        size = length if length >= 2 else (n - i if kind == KIND else 2)
        if kind == KIND:
            out.append(opts[i:i + size])
        i += size
    return out


# Ethernet type; IPv4 version/IHL, total length, fragment field, protocol, addresses; TCP up to its flags.
_ETH_IP4_TCP = struct.Struct("!12xHBxHxxHxBxxIIHHIIBBHxxH").unpack_from


def _segment(buf: bytes, o: int, caplen: int, origlen: int, linktype: int, frame: int, time: float,
             _fast=_ETH_IP4_TCP, _v4=_V4):
    """The Packet in the frame at buf[o:o + caplen], or one of _NOT_TCP, _FRAGMENT, _MALFORMED."""
    end = o + caplen
    # The hot path, one unpack: Ethernet, IPv4 without options, not a fragment, TCP.
    if linktype == 1 and caplen >= 54:
        et, vihl, total, frag, proto, s, d, sport, dport, seq, ack, off, fl, win, urg = _fast(buf, o)
        if et == 0x0800 and vihl == 0x45 and proto == 6 and not frag & 0x1FFF:
            hl = (off >> 4) * 4
            if total == 0:
                total = origlen - 14
            payload = total - 20 - hl
            if hl < 20 or 34 + hl > caplen or payload < 0:
                return _MALFORMED
            ws = None
            if hl > 20:
                opts = buf[o + 54:o + 34 + hl]
                raw = _mptcp_chunks(opts) if KIND in opts else []
                if fl & 2:
                    ws = _wscale(opts)
            else:
                raw = []
            return Packet(frame, time, _v4.get(s) or _ipv4_str(s), _v4.get(d) or _ipv4_str(d), sport, dport,
                          (off & 15) << 8 | fl, seq, ack, payload, 4, raw, win, urg, ws)
    # -- link layer
    if linktype == _LT_ETHERNET:
        p = o + 14
        if p > end:
            return _MALFORMED
        et = buf[o + 12] << 8 | buf[o + 13]
        while et in _VLAN:
            if p + 4 > end:
                return _MALFORMED
            et = buf[p + 2] << 8 | buf[p + 3]
            p += 4
        if et == 0x0800:
            version = 4
        elif et == 0x86DD:
            version = 6
        else:
            return _NOT_TCP
    elif linktype in (_LT_SLL, _LT_SLL2):
        p = o + (16 if linktype == _LT_SLL else 20)
        if p > end:
            return _MALFORMED
        q = o + 14 if linktype == _LT_SLL else o
        et = buf[q] << 8 | buf[q + 1]
        if et == 0x0800:
            version = 4
        elif et == 0x86DD:
            version = 6
        else:
            return _NOT_TCP
    else:  # raw IP (and null/loop, whose address family we read from the IP version instead)
        p = o + 4 if linktype in (_LT_NULL, _LT_LOOP) else o
        if p >= end:
            return _MALFORMED
        version = buf[p] >> 4
        if version != 4 and version != 6:
            return _NOT_TCP
    # -- network layer
    if version == 4:
        if p + 20 > end:
            return _MALFORMED
        vihl = buf[p]
        ihl = (vihl & 15) * 4
        if vihl >> 4 != 4 or ihl < 20:
            return _MALFORMED
        total, _, frag, _, proto, _, s, d = _IP4.unpack_from(buf, p + 2)
        if frag & 0x1FFF:
            return _FRAGMENT
        if proto != 6:
            return _NOT_TCP
        if total == 0:  # a segmentation-offload capture: the frame's length is the truth
            total = origlen - (p - o)
        t = p + ihl
        rest = total - ihl
        src = _V4.get(s) or _ipv4_str(s)
        dst = _V4.get(d) or _ipv4_str(d)
    else:
        if p + 40 > end:
            return _MALFORMED
        if buf[p] >> 4 != 6:
            return _MALFORMED
        rest = buf[p + 4] << 8 | buf[p + 5]
        if rest == 0:  # jumbogram or offload: take the frame's length
            rest = origlen - (p - o) - 40
        nh = buf[p + 6]
        t = p + 40
        while nh != 6:
            if nh in _V6_EXT or nh == 51 or nh == 44:
                if t + 8 > end:
                    return _MALFORMED
                if nh == 44:
                    if _H.unpack_from(buf, t + 2)[0] & 0xFFF8:
                        return _FRAGMENT
                    size = 8
                elif nh == 51:  # AH: (payload length + 2) * 4
                    size = (buf[t + 1] + 2) * 4
                else:
                    size = (buf[t + 1] + 1) * 8
                nh = buf[t]
                t += size
                rest -= size
            else:
                return _NOT_TCP
        s, d = buf[p + 8:p + 24], buf[p + 24:p + 40]
        src = _V6.get(s) or _ipv6_str(s)
        dst = _V6.get(d) or _ipv6_str(d)
    # -- TCP
    if t + 20 > end:
        return _MALFORMED
    sport, dport, seq, ack, off, fl, win, urg = _TCP.unpack_from(buf, t)
    hl = (off >> 4) * 4
    payload = rest - hl
    if hl < 20 or t + hl > end or payload < 0:
        return _MALFORMED
    ws = None
    if hl > 20:
        opts = buf[t + 20:t + hl]
        raw = _mptcp_chunks(opts) if KIND in opts else []
        if fl & 2:
            ws = _wscale(opts)
    else:
        raw = []
    return Packet(frame, time, src, dst, sport, dport, (off & 15) << 8 | fl, seq, ack, payload, version, raw,
                  win, urg, ws)


# ---------------------------------------------------------------------------------------------
# Capture files
# ---------------------------------------------------------------------------------------------

_CHUNK = 1 << 22
_PCAP_MAGIC = {0xA1B2C3D4: ("<", 1e-6), 0xD4C3B2A1: (">", 1e-6), 0xA1B23C4D: ("<", 1e-9),
               0x4D3CB2A1: (">", 1e-9)}
_PCAPNG_SHB = 0x0A0D0D0A
_BOM = 0x1A2B3C4D
_MAX_RECORD = 1 << 24  # no link layer we read has frames anywhere near 16 MiB: the file is corrupt


def _check_linktype(path, linktype: int, offset: int) -> None:
    if linktype not in _LINKTYPES:
        raise InputError(f"{path}: link type {linktype} at byte offset {offset} is not supported "
                         f"(supported: {', '.join(f'{k} {v}' for k, v in sorted(_LINKTYPES.items()))})")


def _open_header(path: Path) -> tuple[str, bytes]:
    """('pcap' | 'pcapng', first bytes) of `path`, or InputError."""
    try:
        with open(path, "rb") as f:
            head = f.read(28)
    except FileNotFoundError:
        raise InputError(f"{path}: no such capture file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not a capture file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    if len(head) < 4:
        raise InputError(f"{path}: {len(head)} byte(s) at byte offset 0, too short for a capture file header")
    if int.from_bytes(head[:4], "little") == _PCAPNG_SHB:
        return "pcapng", head
    magic = int.from_bytes(head[:4], "little")
    if magic not in _PCAP_MAGIC:
        raise InputError(f"{path}: bad magic 0x{head[:4].hex()} at byte offset 0: neither pcap nor pcapng")
    if len(head) < 24:
        raise InputError(f"{path}: pcap file header truncated at byte offset {len(head)} (24 bytes needed)")
    endian = _PCAP_MAGIC[magic][0]
    _check_linktype(path, struct.unpack_from(endian + "I", head, 20)[0] & 0xFFFF, 20)
    return "pcap", head


def _pcap_packets(path: Path) -> Iterator[Packet | int]:
    with open(path, "rb") as f:
        head = f.read(24)
        endian, unit = _PCAP_MAGIC[int.from_bytes(head[:4], "little")]
        linktype = struct.unpack_from(endian + "I", head, 20)[0] & 0xFFFF
        rec = struct.Struct(endian + "IIII").unpack_from
        read, segment = f.read, _segment
        buf, pos, size, base = b"", 0, 0, 24  # buf holds the file from byte offset base on
        frame = 0
        while True:
            if pos + 16 > size:
                buf, base, pos = buf[pos:] + read(_CHUNK), base + pos, 0
                size = len(buf)
                if size < 16:
                    if size:
                        raise InputError(f"{path}: truncated record header at byte offset {base} "
                                         f"({size} of 16 bytes)")
                    break
            sec, frac, caplen, origlen = rec(buf, pos)
            end = pos + 16 + caplen
            if end > size:
                if caplen > _MAX_RECORD:
                    raise InputError(f"{path}: record at byte offset {base + pos} claims {caplen} bytes: "
                                     "not a sane capture")
                buf, base, pos = buf[pos:] + read(max(_CHUNK, 16 + caplen)), base + pos, 0
                size, end = len(buf), 16 + caplen
                if end > size:
                    raise InputError(f"{path}: truncated record at byte offset {base}: {caplen} bytes "
                                     f"of packet data announced, {size - 16} there")
            frame += 1
            pkt = segment(buf, pos + 16, caplen, origlen, linktype, frame, sec + frac * unit)
            pos = end
            yield pkt


class _NgFormats:
    """The structs of one pcapng section's byte order."""

    def __init__(self, endian: str):
        self.endian = endian
        self.head = struct.Struct(endian + "II").unpack_from  # block type, block total length
        self.u32 = struct.Struct(endian + "I").unpack_from
        self.epb = struct.Struct(endian + "IIIII").unpack_from  # interface, ts high, ts low, caplen, origlen
        self.pb = struct.Struct(endian + "HHIIII").unpack_from  # the obsolete Packet Block's
        self.idb = struct.Struct(endian + "HHI").unpack_from
        self.opt = struct.Struct(endian + "HH").unpack_from
        self.i64 = struct.Struct(endian + "q").unpack_from


_NG = {"<": _NgFormats("<"), ">": _NgFormats(">")}


def _pcapng_packets(path: Path) -> Iterator[Packet | int]:
    with open(path, "rb") as f:
        read, segment = f.read, _segment
        buf, pos, size, base = b"", 0, 0, 0  # buf holds the file from byte offset base on
        fm = _NG["<"]
        head, u32, epb = fm.head, fm.u32, fm.epb
        interfaces: list[tuple[int, int, float, int]] = []  # (linktype, ticks/s, 1/ticks, offset s)
        frame = 0
        sec, frac = 0, 0.0  # the last timestamped packet's (a Simple Packet Block has none)
        while True:
            if pos + 12 > size:
                buf, base, pos = buf[pos:] + read(_CHUNK), base + pos, 0
                size = len(buf)
                if size < 12:
                    if size:
                        raise InputError(f"{path}: truncated block header at byte offset {base} "
                                         f"({size} of 12 bytes)")
                    break
            btype, blen = head(buf, pos)
            if btype == _PCAPNG_SHB:  # a new section, perhaps in the other byte order
                bom = buf[pos + 8:pos + 12]
                if bom == b"\x4d\x3c\x2b\x1a":
                    fm = _NG["<"]
                elif bom == b"\x1a\x2b\x3c\x4d":
                    fm = _NG[">"]
                else:
                    raise InputError(f"{path}: bad byte-order magic 0x{bom.hex()} at byte offset "
                                     f"{base + pos + 8}")
                head, u32, epb = fm.head, fm.u32, fm.epb
                btype, blen = head(buf, pos)
                interfaces = []
            if blen < 12 or blen % 4 or blen > _MAX_RECORD:
                raise InputError(f"{path}: bad block length {blen} at byte offset {base + pos + 4}")
            end = pos + blen
            if end > size:
                buf, base, pos = buf[pos:] + read(max(_CHUNK, blen)), base + pos, 0
                size, end = len(buf), blen
                if end > size:
                    raise InputError(f"{path}: truncated block at byte offset {base}: {blen} bytes "
                                     f"announced, {size} there")
            if u32(buf, end - 4)[0] != blen:
                raise InputError(f"{path}: block at byte offset {base + pos}: trailing length "
                                 f"{u32(buf, end - 4)[0]} differs from {blen}")
            if btype == 6 or btype == 2:  # Enhanced Packet Block, obsolete Packet Block
                if blen < 32:
                    raise InputError(f"{path}: packet block at byte offset {base + pos} is too short")
                if btype == 6:
                    iface, hi, lo, caplen, origlen = epb(buf, pos + 8)
                else:
                    iface, _, hi, lo, caplen, origlen = fm.pb(buf, pos + 8)
                if iface >= len(interfaces):
                    raise InputError(f"{path}: packet block at byte offset {base + pos} names interface "
                                     f"{iface}, but only {len(interfaces)} are described")
                if 32 + caplen > blen:
                    raise InputError(f"{path}: packet block at byte offset {base + pos}: captured length "
                                     f"{caplen} overruns the block")
                linktype, ticks, scale, offset = interfaces[iface]
                sec, frac = divmod(hi << 32 | lo, ticks)
                sec += offset
                frac *= scale
                data = pos + 28
            elif btype == 3:  # Simple Packet Block: interface 0, no timestamp
                if not interfaces:
                    raise InputError(f"{path}: simple packet block at byte offset {base + pos} before any "
                                     "interface block")
                origlen = u32(buf, pos + 8)[0]
                caplen = min(origlen, blen - 16)
                linktype = interfaces[0][0]
                data = pos + 12
            else:
                if btype == 1:  # Interface Description Block
                    interfaces.append(_interface(path, buf, pos, blen, base, fm))
                pos = end
                continue
            frame += 1
            pkt = segment(buf, data, caplen, origlen, linktype, frame, sec + frac)
            pos = end
            yield pkt


def _interface(path: Path, buf: bytes, pos: int, blen: int, base: int, fm: _NgFormats):
    """(link type, ticks per second, seconds per tick, offset in seconds) of an Interface Description Block."""
    if blen < 20:
        raise InputError(f"{path}: interface block at byte offset {base + pos} is too short")
    linktype, _, _ = fm.idb(buf, pos + 8)
    _check_linktype(path, linktype, base + pos + 8)
    ticks, offset = 1_000_000, 0
    i, stop = pos + 16, pos + blen - 4
    while i + 4 <= stop:
        code, olen = fm.opt(buf, i)
        if code == 0:
            break
        if code == 9 and olen >= 1:  # if_tsresol
            v = buf[i + 4]
            ticks = 2 ** (v & 0x7F) if v & 0x80 else 10 ** v
        elif code == 14 and olen >= 8:  # if_tsoffset
            offset = fm.i64(buf, i + 4)[0]
        i += 4 + (olen + 3) // 4 * 4
    return linktype, ticks, 1 / ticks, offset


def iter_pcap(path: str | os.PathLike, stats: PcapStats | None = None) -> Iterator[Packet]:
    """Every TCP segment of the capture at `path`, in file order.

    A file that is not a capture, or is cut short or corrupt, raises InputError naming the file
    and the byte offset: at once for the file header, while iterating for later records.
    Frames whose own headers are truncated or inconsistent are skipped and counted in `stats`
    (pass a PcapStats to get the counts; it is complete once the iterator is exhausted)."""
    path = Path(path)
    kind, _ = _open_header(path)
    stats = stats if stats is not None else PcapStats()
    stats.format = kind
    return _tally(_pcap_packets(path) if kind == "pcap" else _pcapng_packets(path), stats)


def _tally(results: Iterator[Packet | int], stats: PcapStats) -> Iterator[Packet]:
    """Count what the reader found in every frame (into `stats`, also when it stops on bad input)
    and pass the TCP segments on."""
    frames = tcp = not_tcp = frags = bad = nopts = 0
    try:
        for pkt in results:
            frames += 1
            if pkt.__class__ is Packet:
                tcp += 1
                if pkt.raw_options:
                    nopts += len(pkt.raw_options)
                yield pkt
            elif pkt == _NOT_TCP:
                not_tcp += 1
            elif pkt == _FRAGMENT:
                frags += 1
            else:
                bad += 1
    finally:
        stats.frames, stats.tcp, stats.not_tcp, stats.fragments, stats.malformed, stats.mptcp_options = (
            frames, tcp, not_tcp, frags, bad, nopts)


def pcap_stats(path: str | os.PathLike) -> PcapStats:
    """Counts of one full pass over the capture (frames, TCP, skipped, MPTCP options)."""
    stats = PcapStats()
    for _ in iter_pcap(path, stats):
        pass
    return stats

