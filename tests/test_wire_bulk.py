"""The bulk decoder (conformance.wire.bulk) against our scapy classes: option by option on built,
random and mutated bytes, and packet by packet on synthetic captures (every link type, pcap and
pcapng, IPv6 extension headers, fragments, truncation) and on a real two-subflow kernel capture.

The reference for an option is `scapy_fields(parse_option(raw))`, what the suite's scapy path
(conformance.wire.tcpopts) yields; values and their types must both match."""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Raw

from conformance.errors import InputError
from conformance.wire import (
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
    MPTCPOption,
    MPTCPRst,
    RemoveAddr,
    mptcp_options,
    parse_option,
)
from conformance.wire.bulk import PcapStats, decode_option, iter_pcap, pcap_stats, scapy_fields

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, veth, tcpdump)")


def reference(raw: bytes) -> tuple[str, dict]:
    opt = parse_option(raw)
    return type(opt).__name__, scapy_fields(opt)


def assert_same(raw: bytes) -> tuple[str, dict]:
    got, want = decode_option(raw), reference(raw)
    assert got == want, raw.hex()
    assert {k: type(v) for k, v in got[1].items()} == {k: type(v) for k, v in want[1].items()}, raw.hex()
    return got


# --- options: built by every class -------------------------------------------------------------

u8, u16, u32 = st.integers(0, 0xFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)
bit = st.integers(0, 1)
ipv4 = st.tuples(u8, u8, u8, u8).map(lambda t: ".".join(map(str, t)))
ipv6 = st.binary(min_size=16, max_size=16).map(lambda b: __import__("ipaddress").IPv6Address(b).compressed)


@st.composite
def built(draw) -> bytes:
    """An option built by one of our classes: any form, reserved bits and kind byte included;
    now and then with an explicit (usually wrong) length or cut short."""
    which = draw(st.integers(0, 11))
    if which == 0:
        form = draw(st.sampled_from([4, 12, 20, 22, 24]))
        kw = {"version": draw(st.integers(0, 15)), "flags": draw(u8)}
        for name, at in (("sender_key", 12), ("receiver_key", 20)):
            if form >= at:
                kw[name] = draw(u64)
        for name, at in (("data_level_length", 22), ("checksum", 24)):
            if form >= at:
                kw[name] = draw(u16)
        opt = MPCapable(**kw)
    elif which == 1:
        opt = MPJoinSyn(reserved=draw(st.integers(0, 7)), backup=draw(bit), address_id=draw(u8),
                        receiver_token=draw(u32), sender_random=draw(u32))
    elif which == 2:
        opt = MPJoinSynAck(reserved=draw(st.integers(0, 7)), backup=draw(bit), address_id=draw(u8),
                           sender_truncated_hmac=draw(u64), sender_random=draw(u32))
    elif which == 3:
        opt = MPJoinAck(reserved=draw(st.integers(0, 0xFFF)),
                        sender_hmac=draw(st.binary(min_size=20, max_size=20)))
    elif which == 4:
        flags = draw(st.integers(0, 31))
        kw = {"flags": flags, "reserved": draw(st.integers(0, 127))}
        if flags & 1:
            kw["data_ack"] = draw(u64 if flags & 2 else u32)
        if flags & 4:
            kw.update(dsn=draw(u64 if flags & 8 else u32), ssn=draw(u32), data_level_length=draw(u16))
            if draw(st.booleans()):
                kw["checksum"] = draw(u16)
        opt = DSS(**kw)
    elif which == 5:
        kw = {"echo": draw(bit), "reserved": draw(st.integers(0, 7)), "address_id": draw(u8),
              "address": draw(st.one_of(ipv4, ipv6))}
        if draw(st.booleans()):
            kw["port"] = draw(u16)
        if draw(st.booleans()):
            kw["truncated_hmac"] = draw(u64)
        opt = AddAddr(**kw)
    elif which == 6:
        opt = RemoveAddr(reserved=draw(st.integers(0, 15)),
                         address_ids=draw(st.lists(u8, min_size=1, max_size=37)))
    elif which == 7:
        kw = {"backup": draw(bit), "reserved": draw(st.integers(0, 7))}
        if draw(st.booleans()):
            kw["address_id"] = draw(u8)
        opt = MPPrio(**kw)
    elif which == 8:
        opt = MPFail(reserved=draw(st.integers(0, 0xFFF)), dsn=draw(u64))
    elif which == 9:
        opt = MPFastclose(reserved=draw(st.integers(0, 0xFFF)), receiver_key=draw(u64))
    elif which == 10:
        opt = MPTCPRst(flags=draw(st.integers(0, 15)), reason=draw(u8))
    else:  # experimental, or an unassigned subtype 9-14
        opt = MPExperimental(rest=draw(st.integers(0, 15)), data=draw(st.binary(max_size=37)))
        if draw(st.booleans()):
            opt = MPTCPOption(subtype=draw(st.integers(9, 14)), rest=draw(st.integers(0, 15)),
                              data=draw(st.binary(max_size=37)))
    if draw(st.integers(0, 9)) == 0:
        opt.kind = draw(u8)
    raw = bytes(opt)
    twist = draw(st.integers(0, 9))
    if twist == 0:  # an explicit length: right or wrong
        raw = raw[:1] + bytes([draw(u8)]) + raw[2:]
    elif twist == 1 and len(raw) > 1:  # cut short
        raw = raw[:draw(st.integers(1, len(raw) - 1))]
    elif twist == 2:  # bytes past the option (the next option's, in a header)
        raw += draw(st.binary(min_size=1, max_size=8))
    return raw


@settings(max_examples=3000, deadline=None)
@given(built())
def test_built_options_decode_like_scapy(raw):
    name, fields = assert_same(raw)
    if raw and (len(raw) < 2 or not 3 <= raw[1] < len(raw)):  # nothing past the length: scapy's own dispatch
        opt = MPTCPOption(raw)
        assert (type(opt).__name__, scapy_fields(opt)) == (name, fields)


SEEDS = [bytes(o) for o in (
    MPCapable(flags=0x81), MPCapable(sender_key=1), MPCapable(sender_key=1, receiver_key=2),
    MPCapable(sender_key=1, receiver_key=2, data_level_length=3),
    MPCapable(sender_key=1, receiver_key=2, data_level_length=3, checksum=4),
    MPJoinSyn(address_id=1, receiver_token=2, sender_random=3), MPJoinSynAck(sender_truncated_hmac=5),
    MPJoinAck(sender_hmac=bytes(range(20))), DSS(flags=0x01, data_ack=5), DSS(flags=0x03, data_ack=5),
    DSS(flags=0x0F, data_ack=1, dsn=2, ssn=3, data_level_length=4),
    DSS(flags=0x1D, data_ack=1, dsn=2, ssn=3, data_level_length=4, checksum=5),
    AddAddr(address="10.0.2.1", truncated_hmac=1), AddAddr(echo=1, address="2001:db8::1", port=80),
    RemoveAddr(address_ids=[1, 2, 3]), MPPrio(backup=1), MPPrio(address_id=4), MPFail(dsn=9),
    MPFastclose(receiver_key=9), MPTCPRst(flags=1, reason=6), MPExperimental(data=b"xyz"))]


def mutations(rng: random.Random, count: int):
    for _ in range(count):
        pick = rng.random()
        if pick < 0.25:
            yield bytes([30, rng.randrange(256)]) + rng.randbytes(rng.randrange(0, 40))
        elif pick < 0.3:
            yield rng.randbytes(rng.randrange(0, 6))
        elif pick < 0.4:  # a plausible length for the bytes that follow, any subtype and flags
            body = rng.randbytes(rng.randrange(1, 38))
            yield bytes([30, len(body) + 2]) + body
        else:
            b = bytearray(rng.choice(SEEDS))
            for _ in range(rng.randrange(1, 4)):
                op = rng.randrange(5)
                if op == 0:
                    b[rng.randrange(len(b))] = rng.randrange(256)
                elif op == 1 and len(b) > 1:
                    del b[rng.randrange(1, len(b)):]
                elif op == 2:
                    b += rng.randbytes(rng.randrange(1, 8))
                elif op == 3 and len(b) > 3:
                    b[3] = rng.randrange(256)  # DSS flags, MP_CAPABLE flags, address IDs
                elif len(b) > 1:
                    b[1] = rng.randrange(256)
            yield bytes(b)


def test_random_and_mutated_bytes_decode_like_scapy():
    """25,000 random and mutated byte strings (mostly malformed): same class, same fields."""
    rng = random.Random(8684)
    names: dict[str, int] = {}
    for raw in mutations(rng, 25_000):
        name, _ = assert_same(raw)
        names[name] = names.get(name, 0) + 1
    assert sum(names.values()) == 25_000
    # The mutations reach every class, malformed and unknown included.
    assert set(names) >= {"MPCapable", "MPJoinSyn", "MPJoinSynAck", "MPJoinAck", "DSS", "AddAddr", "RemoveAddr",
                          "MPPrio", "MPFail", "MPFastclose", "MPTCPRst", "MPExperimental", "MPTCPUnknown",
                          "MPTCPMalformed"}


def test_every_length_of_every_subtype():
    """Every subtype with every length a TCP header can carry (and some it cannot: REMOVE_ADDR's
    list limit in scapy sits at 103), each DSS flags byte, random bodies: 21,056 cases."""
    rng = random.Random(3)
    n = 0
    for length in (*range(48), *range(100, 107), 255):
        for subtype in range(16):
            fourth = range(256) if subtype == 2 else rng.sample(range(256), 8)
            for b3 in fourth:
                raw = bytes([30, length, subtype << 4 | rng.randrange(16), b3]) + rng.randbytes(max(0, length - 4))
                assert_same(raw)
                n += 1
    assert n == 56 * (256 + 15 * 8)


def test_decode_option_values_and_odd_inputs():
    name, fields = decode_option(bytes(DSS(flags="AaMm", data_ack=1, dsn=2, ssn=3, data_level_length=4)))
    assert name == "DSS" and fields == {"kind": 30, "length": 26, "subtype": 2, "reserved": 0, "flags": 0x0F,
                                        "data_ack": 1, "dsn": 2, "ssn": 3, "data_level_length": 4}
    assert type(fields["flags"]) is int
    name, fields = decode_option(bytes(AddAddr(address="2001:db8::1", port=443)))
    assert (name, fields["address"], fields["port"]) == ("AddAddr", "2001:db8::1", 443)
    assert decode_option(b"")[0] == "MPTCPMalformed"
    assert decode_option(b"\x1e")[1] == {"kind": 30, "length": None, "data": b"",
                                         "problem": "truncated: 1 byte(s), not even kind and length"}
    raw = bytes(MPJoinAck(sender_hmac=b"h" * 20))
    assert decode_option(bytearray(raw)) == decode_option(memoryview(raw)) == decode_option(raw)
    assert decode_option(None)[0] == "MPTCPMalformed"  # type: ignore[arg-type]


# --- capture files -----------------------------------------------------------------------------

def _sll(ip: bytes, proto: int) -> bytes:
    return struct.pack("!HHH8sH", 0, 1, 6, b"\x02" * 6 + b"\0\0", proto) + ip


def _sll2(ip: bytes, proto: int) -> bytes:
    return struct.pack("!HHIHBB8s", proto, 0, 2, 1, 0, 6, b"\x02" * 6 + b"\0\0") + ip


def write_pcap(path: Path, frames: list[bytes], linktype: int, *, endian: str = "<", nano: bool = False,
               snaplen: int = 65535, times: list[float] | None = None) -> Path:
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    out = [struct.pack(endian + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype)]
    for i, frame in enumerate(frames):
        t = times[i] if times else 1_700_000_000 + i * 0.001
        sec = int(t)
        frac = round((t - sec) * (1e9 if nano else 1e6))
        kept = frame[:snaplen]
        out.append(struct.pack(endian + "IIII", sec, frac, len(kept), len(frame)) + kept)
    path.write_bytes(b"".join(out))
    return path


def _block(btype: int, body: bytes, endian: str = "<") -> bytes:
    body += b"\0" * (-len(body) % 4)
    n = len(body) + 12
    return struct.pack(endian + "II", btype, n) + body + struct.pack(endian + "I", n)


def write_pcapng(path: Path, frames: list[tuple[int, bytes]], linktypes: list[int], *, endian: str = "<",
                 snaplen: int = 65535) -> Path:
    """frames: (interface, bytes); the interfaces have µs and ns resolution alternately."""
    out = [_block(0x0A0D0D0A, struct.pack(endian + "IHHq", 0x1A2B3C4D, 1, 0, -1), endian)]
    for i, lt in enumerate(linktypes):
        opts = b""
        if i % 2:  # if_tsresol = 9 (ns), then end of options
            opts = struct.pack(endian + "HH", 9, 1) + b"\x09\0\0\0" + struct.pack(endian + "HH", 0, 0)
        out.append(_block(1, struct.pack(endian + "HHI", lt, 0, snaplen) + opts, endian))
    out.append(_block(5, struct.pack(endian + "IIII", 0, 0, 0, 0), endian))  # statistics: skipped
    for n, (iface, frame) in enumerate(frames):
        ticks = (1_700_000_000 + n * 0.001) * (1e9 if iface % 2 else 1e6)
        ts = round(ticks)
        kept = frame[:snaplen]
        out.append(_block(6, struct.pack(endian + "IIIII", iface, ts >> 32, ts & 0xFFFFFFFF, len(kept),
                                         len(frame)) + kept, endian))
    path.write_bytes(b"".join(out))
    return path


# 12 + 2 + 26: the full 40 bytes a TCP header has room for.
OPTS = [MPCapable(flags=0x81, sender_key=0x0102030405060708), ("NOP", None), ("NOP", None),
        DSS(flags="AaMm", data_ack=7, dsn=8, ssn=9, data_level_length=10)]


def ip_packets() -> list:
    """IP packets with TCP (MPTCP options, v4 and v6, extension headers) and without."""
    tcp = TCP(sport=1, dport=2, seq=3, ack=4, flags="PA", options=OPTS) / Raw(b"x" * 100)
    v6 = IPv6(src="2001:db8:1::1", dst="2001:db8:2::2")
    pkts = [
        IP(src="198.18.0.1", dst="198.19.0.2") / tcp,
        IP(src="198.18.0.1", dst="198.19.0.2", flags="MF") / tcp,  # first fragment: TCP is there
        v6 / tcp,
        v6 / IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting() / IPv6ExtHdrDestOpt() / tcp,
        v6 / IPv6ExtHdrFragment(offset=0, m=1) / tcp,
        IP(src="198.18.0.1", dst="198.19.0.2") / TCP(sport=5, dport=6, flags="S",
                                                     options=[("MSS", 1460), MPCapable(flags=0x81)]),
        IP(src="198.18.0.1", dst="198.19.0.2") / TCP(sport=5, dport=6, flags="A"),  # no options at all
        IP(src="198.18.0.1", dst="198.19.0.2") / TCP(sport=5, dport=6, flags="A", options=[("NOP", None)] * 4),
        IP(src="198.18.0.1", dst="198.19.0.2") / UDP() / Raw(b"y" * 10),  # not TCP
        IP(src="198.18.0.1", dst="198.19.0.2", frag=100, proto=6) / Raw(b"z" * 40),  # non-first fragment
        v6 / IPv6ExtHdrFragment(offset=100, nh=6) / Raw(b"z" * 40),  # non-first fragment
    ]
    return [type(p)(bytes(p)) for p in pkts]  # as dissected from the wire: every length filled in


def expect(pkt) -> tuple:
    """What iter_pcap must say about a scapy packet with TCP (payload length from the IP header)."""
    tcp = pkt[TCP]
    if IP in pkt:
        ip = pkt[IP]
        payload = ip.len - ip.ihl * 4 - tcp.dataofs * 4
    else:
        ip = pkt[IPv6]
        ext = len(bytes(ip.payload)) - len(bytes(tcp))  # extension headers between IPv6 and TCP
        payload = ip.plen - ext - tcp.dataofs * 4
    opts = [(type(o).__name__, scapy_fields(o)) for o in mptcp_options(tcp)]
    return (ip.src, ip.dst, tcp.sport, tcp.dport, int(tcp.flags) | tcp.reserved << 9, tcp.seq, tcp.ack, payload,
            ip.version, opts)


def seen(p) -> tuple:
    return (p.src, p.dst, p.sport, p.dport, p.flags, p.seq, p.ack, p.payload_len, p.ip_version, p.options)


LINKS = {
    "ethernet": (1, lambda ip: bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / ip)),
    "vlan": (1, lambda ip: bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / Dot1Q(vlan=7) / ip)),
    "raw": (101, bytes),
    "sll": (113, lambda ip: _sll(bytes(ip), 0x0800 if ip.version == 4 else 0x86DD)),
    "sll2": (276, lambda ip: _sll2(bytes(ip), 0x0800 if ip.version == 4 else 0x86DD)),
    "null": (0, lambda ip: struct.pack("<I", 2 if ip.version == 4 else 30) + bytes(ip)),
}


def _frames(link: str) -> list[tuple[bytes, object]]:
    """(frame bytes, the scapy packet if it carries TCP else None) for every packet of ip_packets()."""
    _, wrap = LINKS[link]
    out = [(wrap(p), p if TCP in p else None) for p in ip_packets()]
    if link in ("ethernet", "vlan"):
        out.insert(3, (bytes(Ether() / ARP()), None))  # not IP at all
    return out


@pytest.mark.parametrize("link", list(LINKS))
@pytest.mark.parametrize("variant", ["le-us", "be-ns", "pcapng", "pcapng-be", "snap96"])
def test_synthetic_capture_every_link_type(tmp_path, link, variant):
    lt, _ = LINKS[link]
    items = _frames(link)
    frames = [f for f, _ in items]
    path = tmp_path / f"{link}.cap"
    snaplen = 96 if variant == "snap96" else 65535
    if variant.startswith("pcapng"):
        write_pcapng(path, [(i % 2, f) for i, f in enumerate(frames)], [lt, lt],
                     endian=">" if variant.endswith("be") else "<")
    else:
        write_pcap(path, frames, lt, endian=">" if variant == "be-ns" else "<", nano=variant == "be-ns",
                   snaplen=snaplen)
    # Frames whose headers the snaplen cut are skipped (and counted); the others lose only payload.
    fits = [(f, p) for f, p in items if p is not None and len(f) - len(bytes(p[TCP].payload)) <= snaplen]
    cut = sum(1 for _, p in items if p is not None) - len(fits)
    stats = PcapStats()
    got = list(iter_pcap(path, stats))
    assert [seen(p) for p in got] == [expect(p) for _, p in fits]
    assert (stats.tcp, stats.malformed, stats.fragments, stats.frames) == (len(fits), cut, 2, len(frames))
    assert stats.not_tcp == len(frames) - stats.tcp - stats.fragments - stats.malformed
    assert stats.format == ("pcapng" if variant.startswith("pcapng") else "pcap")
    assert (cut > 0) == (variant == "snap96")  # IPv6 + extension headers + TCP with 40 bytes of options
    # Frame numbers count every record; times are the records' own (epoch seconds, 1 ms apart here).
    assert [p.frame for p in got] == [i + 1 for i, (f, p) in enumerate(items) if any(f is g for g, _ in fits)]
    for p in got:
        assert p.time - got[0].time == pytest.approx((p.frame - got[0].frame) * 0.001, abs=2e-6)
    if shutil.which("tshark") and variant != "snap96":
        assert_like_tshark(path, got)


def assert_like_tshark(path: Path, got) -> None:
    """Frame numbers, times, addresses, ports, flags and payload lengths as tshark reads the file."""
    fields = ["frame.number", "frame.time_epoch", "ip.src", "ipv6.src", "ip.dst", "ipv6.dst", "tcp.srcport",
              "tcp.dstport", "tcp.flags", "tcp.seq_raw", "tcp.ack_raw", "tcp.len", "tcp.options.mptcp.subtype"]
    argv = ["tshark", "-n", "-r", str(path), "-o", "ip.defragment:FALSE", "-o", "ipv6.defragment:FALSE",
            "-Y", "tcp", "-T", "fields", "-E", "occurrence=f"]
    for f in fields:
        argv += ["-e", f]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout
    rows = [line.split("\t") for line in out.splitlines()]
    by_frame = {p.frame: p for p in got}
    assert sorted(int(r[0]) for r in rows) == sorted(by_frame), "tshark sees the same TCP frames"
    for r in rows:
        p = by_frame[int(r[0])]
        assert float(r[1]) == pytest.approx(p.time, abs=1e-6)
        assert (r[2] or r[3], r[4] or r[5]) == (p.src, p.dst)
        assert (int(r[6]), int(r[7]), int(r[8], 16), int(r[9]), int(r[10])) == (
            p.sport, p.dport, p.flags, p.seq, p.ack)
        if r[11]:  # tshark leaves a first fragment's TCP length out
            assert int(r[11]) == p.payload_len


def test_tcp_flags_include_ns_and_reserved_bits(tmp_path):
    pkt = IP(src="10.0.0.1", dst="10.0.0.2") / TCP(flags="SAN", reserved=5)
    (p,) = iter_pcap(write_pcap(tmp_path / "f.pcap", [bytes(pkt)], 101))
    assert p.flags == 0x100 | 0x12 | 5 << 9


def test_hostile_options_in_a_header(tmp_path):
    """Option bytes walked as conformance.wire.tcpopts walks them: EOL ends them, a kind-30 length
    below 2 takes the rest, a truncated MPTCP option is malformed evidence."""
    cases = [
        bytes.fromhex("1e05200100") + b"\x01\x01\x01",  # DSS length its flags deny
        b"\x01\x1e\x01" + bytes(DSS(flags="A", data_ack=3))[2:] + b"\x01",  # length byte 1
        b"\x00\x1e\x08\x20\x01\x00\x00\x00",  # after EOL: padding
        b"\x1e\x0c" + bytes(6),  # length 12, 8 bytes left
        b"\x08\x0a" + bytes(8) + bytes(DSS(flags="A", data_ack=1)) + b"\x01\x01\x01\x01",  # 1e in a timestamp?
        b"\x08\x0a\x1e\x1e\x1e\x1e\x1e\x1e\x1e\x1e\x01\x01",  # kind-30 bytes inside another option only
        b"\x1e\x00\x00\x00",  # length 0
        b"\x05\x01\x1e\x03\x20\x00",  # SACK with length 1 (scapy assumes 2)
    ]
    frames = []
    for opts in cases:
        opts += b"\x00" * (-len(opts) % 4)
        tcp = bytes(TCP(sport=1, dport=2, flags="A"))[:12] + bytes([(5 + len(opts) // 4) << 4, 0x10]) + bytes(6)
        frames.append(bytes(IP(src="10.0.0.1", dst="10.0.0.2", proto=6) / Raw(tcp + opts)))
    got = list(iter_pcap(write_pcap(tmp_path / "h.pcap", frames, 101)))
    assert len(got) == len(cases)
    for p, frame in zip(got, frames, strict=True):
        want = [(type(o).__name__, scapy_fields(o)) for o in mptcp_options(IP(frame)[TCP])]
        assert p.options == want, p
        assert len(p.raw_options) == len(want)


def test_truncated_frames_are_skipped_and_counted(tmp_path):
    good = bytes(Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(options=OPTS))
    frames = [good, good[:10], good[:30], good[:40], good[:14 + 20 + 30], good]
    bad_ihl = bytearray(good)
    bad_ihl[14] = 0x43  # IHL 3
    bad_off = bytearray(good)
    bad_off[14 + 20 + 12] = 0x30  # data offset 3
    short_total = bytearray(good)
    short_total[16:18] = (30).to_bytes(2, "big")  # IP total length shorter than the headers
    frames += [bytes(bad_ihl), bytes(bad_off), bytes(short_total)]
    stats = pcap_stats(write_pcap(tmp_path / "t.pcap", frames, 1))
    assert (stats.frames, stats.tcp, stats.malformed) == (9, 2, 7)
    assert stats.mptcp_options == 4


def test_payload_length_comes_from_the_ip_header_not_the_snaplen(tmp_path):
    pkt = IP(src="10.0.0.1", dst="10.0.0.2") / TCP(options=OPTS) / Raw(b"p" * 1000)
    (p,) = iter_pcap(write_pcap(tmp_path / "s.pcap", [bytes(Ether() / pkt)], 1, snaplen=128))
    assert p.payload_len == 1000 and [n for n, _ in p.options] == ["MPCapable", "DSS"]


# --- broken files: one InputError line naming the file and the place ---------------------------

def _one_line_error(path: Path, *needles: str) -> str:
    with pytest.raises(InputError) as info:
        for _ in iter_pcap(path):
            pass
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{path}:"), msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_bad_capture_files(tmp_path):
    frame = bytes(Ether() / IP() / TCP(options=OPTS))
    good = write_pcap(tmp_path / "good.pcap", [frame] * 3, 1)
    data = good.read_bytes()
    last = 24 + 2 * (16 + len(frame))  # where the third record starts
    cases = {
        "missing.pcap": (None, ("no such capture file",)),
        "empty.pcap": (b"", ("offset 0",)),
        "magic.pcap": (b"GIF89a" + data[6:], ("bad magic", "offset 0")),
        "text.pcap": (b"hello world, not a capture\n" * 3, ("bad magic",)),
        "header.pcap": (data[:20], ("header truncated", "offset 20")),
        "rechdr.pcap": (data + b"\x01" * 7, ("truncated record header", f"offset {len(data)}")),
        "recdata.pcap": (data[:-5], ("truncated record at", f"offset {last}")),
        "huge.pcap": (data[:24] + struct.pack("<IIII", 0, 0, 1 << 30, 1 << 30), ("offset 24",)),
        "linktype.pcap": (data[:20] + struct.pack("<I", 147) + data[24:], ("link type 147", "offset 20")),
        "ng-blocklen.pcapng": (struct.pack("<III", 0x0A0D0D0A, 13, 0x1A2B3C4D) + bytes(20),
                               ("bad block length 13", "offset 4")),
        "ng-bom.pcapng": (_block(0x0A0D0D0A, struct.pack("<IHHq", 0x11223344, 1, 0, -1)), ("byte-order magic",)),
        "ng-trunc.pcapng": (write_pcapng(tmp_path / "x.pcapng", [(0, bytes(IP() / TCP()))], [101])
                            .read_bytes()[:-6], ("truncated block",)),
        "ng-iface.pcapng": (_block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))
                            + _block(6, struct.pack("<IIIII", 3, 0, 0, 4, 4) + b"abcd"), ("interface 3",)),
    }
    for name, (content, needles) in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        _one_line_error(path, *needles)
    assert (tmp_path / "good.pcap").exists()
    assert len(list(iter_pcap(good))) == 3
    # The file header is checked when iter_pcap is called, before any iteration.
    with pytest.raises(InputError):
        iter_pcap(tmp_path / "magic.pcap")
    with pytest.raises(InputError, match="is a directory"):
        iter_pcap(tmp_path)


def test_packets_before_a_truncated_record_are_yielded(tmp_path):
    data = write_pcap(tmp_path / "g.pcap", [bytes(Ether() / IP() / TCP(options=OPTS))] * 3, 1).read_bytes()
    (tmp_path / "cut.pcap").write_bytes(data[:-5])
    it = iter_pcap(tmp_path / "cut.pcap")
    assert next(it).frame == 1 and next(it).frame == 2
    with pytest.raises(InputError, match="truncated record"):
        next(it)


# --- a real capture: two kernels, two subflows -------------------------------------------------

@needs_root
def test_real_capture_matches_scapy_and_tshark(tmp_path):
    from scapy.utils import PcapReader

    from conformance import doctor
    from conformance.endpoints.linux import EndpointFlags, MptcpConfig, PMEndpoint
    from conformance.errors import CapabilityMissing
    from conformance.lab import MB, Lab
    from conformance.net.cleanup import Cleanup
    from conformance.net.registry import make_topology
    from conformance.observe.oracles import tshark_frames

    try:
        doctor.require("root", "socket:mptcp", "tcpdump", "tshark", "mnexec", "ethtool")
    except CapabilityMissing as exc:
        pytest.skip(f"this machine cannot run a transfer: {exc}")
    cleanup = Cleanup()
    try:
        lab = Lab(make_topology("two_path"), tmp_path / "lab", cleanup)
        second = lab.addresses("c1")[1]
        lab.configure("s1", MptcpConfig(subflows=2))
        lab.configure("c1", MptcpConfig(subflows=2, endpoints=[PMEndpoint(second, EndpointFlags.SUBFLOW,
                                                                          dev="c1-eth1")]))
        run = lab.transfer(up=2 * MB, down=2 * MB, wait_subflows=2)
    finally:
        cleanup.run()
    names: dict[str, int] = {}
    total_pkts = total_opts = 0
    for intf in ("c1-eth0", "c1-eth1"):
        path = run.pcaps[intf]
        stats = PcapStats()
        ours = list(iter_pcap(path, stats))
        assert stats.malformed == 0 and stats.tcp == len(ours)
        with PcapReader(str(path)) as reader:
            theirs = [(n, pkt) for n, pkt in enumerate(reader, 1) if TCP in pkt]
        assert [p.frame for p in ours] == [n for n, _ in theirs]
        for p, (_, pkt) in zip(ours, theirs, strict=True):
            assert seen(p) == expect(pkt), p.frame
            assert p.raw_options == [bytes(o) for o in mptcp_options(pkt[TCP])]
            for name, _ in p.options:
                names[name] = names.get(name, 0) + 1
            total_opts += len(p.options)
        # tshark (the second oracle) sees the same TCP segments and the same MPTCP subtypes in them.
        frames = tshark_frames(path)
        assert sorted(frames) == [p.frame for p in ours]
        for p in ours:
            subtypes = frames[p.frame].get("tcp.options.mptcp.subtype", [])
            assert [int(v) for v in subtypes] == [f["subtype"] for _, f in p.options], p.frame
        total_pkts += len(ours)
    assert total_pkts > 1000 and total_opts >= 0.9 * total_pkts
    assert {"MPCapable", "MPJoinSyn", "MPJoinSynAck", "MPJoinAck", "DSS"} <= set(names), names
    assert "MPTCPMalformed" not in names
