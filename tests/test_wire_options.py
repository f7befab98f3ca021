"""The MPTCP option layers: byte-exact vectors both ways, round trips, scapy integration, fuzzing.

Vectors are (hex, class, fields), checked as build (`bytes(cls(**fields)) == raw`) and as dissect
(`MPTCPOption(raw)` is `cls` with those fields). Sources: the layouts of RFC 8684 §3 (figures
cited per class) and options captured from Linux 6.18 in this suite's topologies."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

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
    MPTCPMalformed,
    MPTCPOption,
    MPTCPRst,
    MPTCPUnknown,
    RemoveAddr,
    mptcp_options,
    parse_option,
)
from conformance.wire.options import problem_of

KEY_A, KEY_B = 0x0102030405060708, 0x1112131415161718

VECTORS = [
    # MP_CAPABLE §3.1 Fig. 4: SYN (v1, H), SYN/ACK, third ACK, first data, first data + checksum
    ("1e040101", MPCapable, {"version": 1, "flags": 0x01}),
    ("1e0c01810102030405060708", MPCapable, {"flags": 0x81, "sender_key": KEY_A}),
    ("1e14010101020304050607081112131415161718", MPCapable,
     {"sender_key": KEY_A, "receiver_key": KEY_B}),
    ("1e160101010203040506070811121314151617180064", MPCapable,
     {"sender_key": KEY_A, "receiver_key": KEY_B, "data_level_length": 100}),
    ("1e1801810102030405060708111213141516171800641234", MPCapable,
     {"flags": 0x81, "sender_key": KEY_A, "receiver_key": KEY_B, "data_level_length": 100,
      "checksum": 0x1234}),
    # RFC 6824 v0 SYN: length 12 with the sender's key, version 0, flag H meaning HMAC-SHA1 there
    ("1e0c00810102030405060708", MPCapable, {"version": 0, "flags": 0x81, "sender_key": KEY_A}),
    # MP_JOIN §3.2 Figs. 5-7 (captured from Linux: token, nonce, truncated HMAC, HMAC)
    ("1e0c10017b6897f0b886f9c3", MPJoinSyn,
     {"backup": 0, "address_id": 1, "receiver_token": 0x7B6897F0, "sender_random": 0xB886F9C3}),
    ("1e0c11027b6897f0b886f9c3", MPJoinSyn,
     {"backup": 1, "address_id": 2, "receiver_token": 0x7B6897F0, "sender_random": 0xB886F9C3}),
    ("1e101000e5f52367fcb9ed59874db36d", MPJoinSynAck,
     {"address_id": 0, "sender_truncated_hmac": 0xE5F52367FCB9ED59, "sender_random": 0x874DB36D}),
    ("1e1810001e58bd8b0d635efc25e791fea76d3943cda617a7", MPJoinAck,
     {"sender_hmac": bytes.fromhex("1e58bd8b0d635efc25e791fea76d3943cda617a7")}),
    # DSS §3.3 Fig. 9: Data ACK only (4, 8 bytes), mapping with 8-byte DSN, with checksum, DATA_FIN
    ("1e08200100000005", DSS, {"flags": 0x01, "data_ack": 5}),
    ("1e0c20030000000000000005", DSS, {"flags": 0x03, "data_ack": 5}),
    ("1e16200dcbb7b4829e90a079b9b6907e0000000131b0", DSS,
     {"flags": 0x0D, "data_ack": 0xCBB7B482, "dsn": 0x9E90A079B9B6907E, "ssn": 1, "data_level_length": 0x31B0}),
    ("1e1c200f00000000000000050000000000000007000000010064abcd", DSS,
     {"flags": 0x0F, "data_ack": 5, "dsn": 7, "ssn": 1, "data_level_length": 100, "checksum": 0xABCD}),
    ("1e16201d000000050000000000000007000000000001", DSS,
     {"flags": 0x1D, "data_ack": 5, "dsn": 7, "ssn": 0, "data_level_length": 1}),
    # ADD_ADDR §3.4.1 Fig. 12: v4 with HMAC, v4 echo, v4 with port and HMAC, v6 echo with port
    ("1e10300198130202014b3007310c639c", AddAddr,
     {"echo": 0, "address_id": 1, "address": "152.19.2.2", "truncated_hmac": 0x014B3007310C639C}),
    ("1e0831010a000201", AddAddr, {"echo": 1, "address_id": 1, "address": "10.0.2.1"}),
    ("1e1230020a0002011f90b08c3eb910379895", AddAddr,
     {"address_id": 2, "address": "10.0.2.1", "port": 8080, "truncated_hmac": 0xB08C3EB910379895}),
    ("1e16310320010db80000000000000000000000011f90", AddAddr,
     {"echo": 1, "address_id": 3, "address": "2001:db8::1", "port": 8080}),
    # REMOVE_ADDR §3.4.2 Fig. 13, MP_PRIO §3.3.8 Fig. 11 (v1 and the v0 form with an ID)
    ("1e044001", RemoveAddr, {"address_ids": [1]}),
    ("1e0640010203", RemoveAddr, {"address_ids": [1, 2, 3]}),
    ("1e0351", MPPrio, {"backup": 1}),
    ("1e045105", MPPrio, {"backup": 1, "address_id": 5}),
    # MP_FAIL §3.7 Fig. 16, MP_FASTCLOSE §3.5 Fig. 14, MP_TCPRST §3.6 Fig. 15, MP_EXPERIMENTAL §7.2
    ("1e0c60000102030405060708", MPFail, {"dsn": KEY_A}),
    ("1e0c70001112131415161718", MPFastclose, {"receiver_key": KEY_B}),
    ("1e048106", MPTCPRst, {"flags": 0x01, "reason": 6}),
    ("1e048001", MPTCPRst, {"flags": 0x00, "reason": 1}),
    ("1e06f0616263", MPExperimental, {"data": b"abc"}),
]


def fields_of(opt: MPTCPOption) -> dict:
    return {f.name: opt.getfieldval(f.name) for f in opt.fields_desc}


@pytest.mark.parametrize("hexbytes, cls, fields", VECTORS, ids=[f"{v[1].__name__}-{v[0][:12]}" for v in VECTORS])
def test_vector_dissects_to_class_and_fields(hexbytes, cls, fields):
    opt = MPTCPOption(bytes.fromhex(hexbytes))
    assert type(opt) is cls
    got = fields_of(opt)
    for key, value in fields.items():
        assert got[key] == value, key
    assert opt.length == len(bytes.fromhex(hexbytes))


@pytest.mark.parametrize("hexbytes, cls, fields", VECTORS, ids=[f"{v[1].__name__}-{v[0][:12]}" for v in VECTORS])
def test_vector_builds_byte_exact(hexbytes, cls, fields):
    # Fields the vector leaves out keep their defaults, which the vectors were written with.
    assert bytes(cls(**fields)).hex() == hexbytes


@pytest.mark.parametrize("hexbytes, problem", [
    ("1e", "truncated"),
    ("1e02", "shorter than kind, length and subtype"),
    ("1e16010101020304", "truncated: length says 22"),
    ("1e0501810102", "MP_CAPABLE length 5"),
    ("1e0d10017b6897f0b886f9c3aa", "MP_JOIN length 13"),
    ("1e0a200d0000000000000000", "does not match its flags"),
    ("1e0b30010a000201000000", "ADD_ADDR length 11"),
    ("1e034000", "REMOVE_ADDR lists no address ID"),
    ("1e05810600", "MP_TCPRST length 5"),
    ("1e0b600001020304050607", "MP_FAIL length 11"),
])
def test_malformed_bytes_say_what_is_wrong(hexbytes, problem):
    raw = bytes.fromhex(hexbytes)
    opt = parse_option(raw)
    assert isinstance(opt, MPTCPMalformed)
    assert problem in opt.problem
    # Kept byte for byte (up to its own length), so evidence shows what was on the wire.
    assert bytes(opt) == (raw[:raw[1]] if len(raw) > 1 and 3 <= raw[1] <= len(raw) else raw)
    assert problem in repr(opt)


def test_unassigned_subtype_is_unknown_not_malformed():
    opt = parse_option(bytes.fromhex("1e0590aabb"))
    assert isinstance(opt, MPTCPUnknown) and opt.subtype == 9 and opt.problem is None


def test_explicit_wrong_length_is_built_as_given():
    raw = bytes(MPCapable(length=9, sender_key=KEY_A))
    assert raw[1] == 9
    assert isinstance(parse_option(raw), MPTCPMalformed)


# --- scapy integration -------------------------------------------------------------------------

def _tcp_header(options_len: int) -> bytes:
    """A bare 20-byte TCP header whose data offset announces `options_len` bytes of options."""
    return bytes(TCP(flags="A"))[:12] + bytes([(5 + options_len // 4) << 4, 0x10]) + bytes(6)


def test_tcp_options_accept_our_objects_and_dissect_back():
    opts = [("MSS", 1460), ("SAckOK", b""), MPCapable(flags="AH"),
            ("NOP", None), ("NOP", None), ("MPTCP", AddAddr(address_id=2, address="10.0.2.1", truncated_hmac=1))]
    pkt = IP(dst="198.19.0.2") / TCP(flags="S", options=opts)
    back = IP(bytes(pkt))
    decoded = mptcp_options(back[TCP])
    assert [type(o) for o in decoded] == [MPCapable, AddAddr]
    assert decoded[0].flags == 0x81 and decoded[0].length == 4
    assert decoded[1].address == "10.0.2.1" and decoded[1].truncated_hmac == 1
    # MSS 4 + SAckOK 2 + MP_CAPABLE 4 + 2 NOPs + ADD_ADDR 16 = 28 bytes of options: 12 words of header.
    assert back[TCP].dataofs == 12


def test_parsed_packet_rebuilds_to_the_same_bytes():
    dss = DSS(flags="AaMm", data_ack=1, dsn=2, ssn=3, data_level_length=4)
    pkt = IPv6(dst="2001:db8:2::2") / TCP(options=[("NOP", None), ("NOP", None), ("Timestamp", (1, 2)), dss])
    raw = bytes(pkt)
    again = IPv6(raw)
    again[TCP].chksum = None  # force a real rebuild, not the cached bytes
    assert bytes(again)[:len(raw)] == raw[:len(raw)]
    clone = TCP(bytes(again[TCP]))
    clone.options = list(clone.options)  # a rebuild from the decoded objects
    assert bytes(clone) == bytes(again[TCP])


def test_show_prints_decoded_mptcp_options():
    pkt = IP(bytes(IP() / TCP(options=[MPJoinSyn(address_id=1, receiver_token=0x7B6897F0, sender_random=7)])))
    shown = pkt.show(dump=True)
    assert "MP_JOIN" in shown


def test_malformed_option_inside_a_tcp_header_is_evidence_not_a_crash():
    raw_opts = bytes.fromhex("1e05200100") + b"\x01\x01\x01"  # DSS with a length its flags deny
    tcp = TCP(_tcp_header(len(raw_opts)) + raw_opts)
    (opt,) = mptcp_options(tcp)
    assert isinstance(opt, MPTCPMalformed) and "does not match its flags" in opt.problem


# --- round trips and fuzzing -------------------------------------------------------------------

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)
ipv4 = st.tuples(u8, u8, u8, u8).map(lambda t: ".".join(map(str, t)))
ipv6 = st.binary(min_size=16, max_size=16).map(lambda b: __import__("ipaddress").IPv6Address(b).compressed)


@st.composite
def options(draw):
    kind = draw(st.sampled_from(range(12)))
    if kind == 0:
        form = draw(st.sampled_from([4, 12, 20, 22, 24]))
        kw = {"version": draw(st.integers(0, 15)), "flags": draw(u8)}
        if form >= 12:
            kw["sender_key"] = draw(u64)
        if form >= 20:
            kw["receiver_key"] = draw(u64)
        if form >= 22:
            kw["data_level_length"] = draw(u16)
        if form >= 24:
            kw["checksum"] = draw(u16)
        return MPCapable(**kw)
    if kind == 1:
        return MPJoinSyn(backup=draw(st.integers(0, 1)), address_id=draw(u8), receiver_token=draw(u32),
                         sender_random=draw(u32))
    if kind == 2:
        return MPJoinSynAck(backup=draw(st.integers(0, 1)), address_id=draw(u8),
                            sender_truncated_hmac=draw(u64), sender_random=draw(u32))
    if kind == 3:
        return MPJoinAck(sender_hmac=draw(st.binary(min_size=20, max_size=20)))
    if kind == 4:
        flags = draw(st.integers(0, 31))
        kw = {"flags": flags}
        if flags & 1:
            kw["data_ack"] = draw(u64 if flags & 2 else u32)
        if flags & 4:
            kw.update(dsn=draw(u64 if flags & 8 else u32), ssn=draw(u32), data_level_length=draw(u16))
            if draw(st.booleans()):
                kw["checksum"] = draw(u16)
        return DSS(**kw)
    if kind == 5:
        echo = draw(st.integers(0, 1))
        kw = {"echo": echo, "address_id": draw(u8), "address": draw(st.one_of(ipv4, ipv6))}
        if draw(st.booleans()):
            kw["port"] = draw(u16)
        if not echo:
            kw["truncated_hmac"] = draw(u64)
        return AddAddr(**kw)
    if kind == 6:
        return RemoveAddr(address_ids=draw(st.lists(u8, min_size=1, max_size=20)))
    if kind == 7:
        kw = {"backup": draw(st.integers(0, 1))}
        if draw(st.booleans()):
            kw["address_id"] = draw(u8)
        return MPPrio(**kw)
    if kind == 8:
        return MPFail(dsn=draw(u64))
    if kind == 9:
        return MPFastclose(receiver_key=draw(u64))
    if kind == 10:
        return MPTCPRst(flags=draw(st.integers(0, 15)), reason=draw(u8))
    return MPExperimental(data=draw(st.binary(max_size=30)))


@settings(max_examples=3000, deadline=None)
@given(options())
def test_build_parse_build_round_trip(opt):
    raw = bytes(opt)
    assert problem_of(raw) is None
    back = MPTCPOption(raw)
    assert type(back) is type(opt)
    assert bytes(back) == raw
    for name, value in opt.fields.items():
        assert back.getfieldval(name) == value, name


def _mutations(rng: random.Random, seeds: list[bytes], count: int):
    for _ in range(count):
        pick = rng.random()
        if pick < 0.3:
            yield bytes([30, rng.randrange(256)]) + rng.randbytes(rng.randrange(0, 40))
        elif pick < 0.4:
            yield rng.randbytes(rng.randrange(0, 6))
        else:
            b = bytearray(rng.choice(seeds))
            for _ in range(rng.randrange(1, 4)):
                op = rng.randrange(4)
                if op == 0 and b:
                    b[rng.randrange(len(b))] = rng.randrange(256)
                elif op == 1 and len(b) > 1:
                    del b[rng.randrange(1, len(b)):]
                elif op == 2:
                    b += rng.randbytes(rng.randrange(1, 8))
                elif len(b) > 1:
                    b[1] = rng.randrange(256)
            yield bytes(b)


def test_fuzz_decoder_never_raises():
    """100,000 random and mutated option byte strings: every one decodes to an object."""
    rng = random.Random(8684)
    seeds = [bytes.fromhex(h) for h, _, _ in VECTORS]
    seen = 0
    for raw in _mutations(rng, seeds, 100_000):
        opt = parse_option(raw)
        assert isinstance(opt, MPTCPOption)
        if isinstance(opt, MPTCPMalformed):
            assert opt.problem
        else:
            assert bytes(opt) == raw[:raw[1]]
        assert isinstance(opt.problem, str | None)
        seen += 1
    assert seen == 100_000


def test_fuzz_tcp_header_with_hostile_options_never_raises():
    rng = random.Random(30)
    seeds = [bytes.fromhex(h) for h, _, _ in VECTORS]
    for raw in _mutations(rng, seeds, 5_000):
        opts = (raw + b"\x01" * 3)[:40]
        opts += b"\x00" * (-len(opts) % 4)
        tcp = TCP(_tcp_header(len(opts)) + opts)
        for opt in mptcp_options(tcp):
            assert isinstance(opt, MPTCPOption)
