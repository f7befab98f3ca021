"""Our MPTCP codec and cryptography against independent oracles (root only).

1. Live corpus (tests/wire_corpus.py): kernel-to-kernel captures with every option the kernel
   sends (MP_CAPABLE of every length with and without checksums, MP_JOIN, DSS of every form incl.
   DATA_FIN and checksums, ADD_ADDR v4/v6 with and without port and its echo, REMOVE_ADDR, MP_PRIO,
   MP_FASTCLOSE, MP_TCPRST), in IPv4 and IPv6. Every MPTCP option of every TCP segment is decoded
   by our codec (scapy's pcap reader, `PcapReader`, the streaming form of `rdpcap`, after
   `import conformance.wire`), by the bulk decoder the cases use, and by tshark (`-T fields -e`),
   and every field tshark exposes is compared.
2. Synthetic packets of every subtype and field combination, built with our classes and written
   with `wrpcap`, compared the same way (plus our own build/dissect round trip).
3. Cryptography against the kernel: tokens and IDSNs (against tshark and the kernel's MPTCP_INFO),
   MP_JOIN HMACs, ADD_ADDR HMACs, MP_FASTCLOSE keys, and DSS checksums recomputed over the
   reassembled payload of each mapping.

The comparison itself is the library's (conformance.observe.oracles: tshark_frames, tshark_view,
compare_frames), the one every case runs after each transfer. Here it is fed twice per capture:
with our scapy decode (converted by oracles.option_of) and with the bulk decoder cases use
(conformance.observe.segments); both must agree with tshark and with each other. Where tshark does
not show a field at all (oracles.TSHARK_BLIND) the kernel's cryptography is the oracle instead."""

from __future__ import annotations

import concurrent.futures
import ipaddress
import json
import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.utils import PcapReader, wrpcap
from wire_corpus import Corpus, CorpusPcap, build_corpus

import conformance.wire  # noqa: F401  (scapy's TCP layer decodes kind 30 into our classes from here on)
from conformance import doctor
from conformance.errors import CapabilityMissing
from conformance.net.names import our_netns, run_prefix
from conformance.observe import segments
from conformance.observe.oracles import (
    IDSN,
    TOKEN,
    Agreement,
    compare,
    compare_frames,
    option_of,
    subtype_name,
    tshark_frames,
)
from conformance.wire import crypto, mptcp_options
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
    MPTCPOption,
    MPTCPRst,
    MPTCPUnknown,
    RemoveAddr,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="builds network namespaces and captures: needs root")

REQUIRED_SUBTYPES = ("MP_CAPABLE", "MP_JOIN", "DSS", "ADD_ADDR", "REMOVE_ADDR", "MP_PRIO", "MP_FASTCLOSE",
                     "MP_TCPRST")
# Forms the live kernel must have produced (so the comparison cannot pass on a thin corpus).
REQUIRED_FORMS = ("MP_CAPABLE/4", "MP_CAPABLE/12", "MP_CAPABLE/20", "MP_CAPABLE/22", "MP_CAPABLE/24",
                  "MP_JOIN/12", "MP_JOIN/16", "MP_JOIN/24", "ADD_ADDR/8", "ADD_ADDR/10", "ADD_ADDR/16",
                  "ADD_ADDR/18", "ADD_ADDR/20", "ADD_ADDR/22", "ADD_ADDR/28", "ADD_ADDR/30")
MAX_SHOWN = 25


# -- our codec -----------------------------------------------------------------------------------
@dataclass
class Frame:
    number: int
    src: str
    dst: str
    sport: int
    dport: int
    flags: int
    seq: int
    options: list[MPTCPOption]
    payload: bytes | None  # None when the capture cut it short

    @property
    def direction(self) -> tuple[str, int, str, int]:
        return (self.src, self.sport, self.dst, self.dport)

    def has(self, flag: str) -> bool:
        return bool(self.flags & {"F": 0x01, "S": 0x02, "R": 0x04, "A": 0x10}[flag])


def decode_ours(pcap: Path) -> dict[int, Frame]:
    """frame number -> Frame for every TCP segment, decoded by scapy with our MPTCP layers."""
    frames = {}
    with PcapReader(str(pcap)) as reader:
        for number, pkt in enumerate(reader, start=1):
            tcp = pkt.getlayer(TCP)
            if tcp is None:
                continue
            ip = pkt.getlayer(IP) or pkt.getlayer(IPv6)
            size = (ip.len - ip.ihl * 4 if isinstance(ip, IP) else ip.plen) - tcp.dataofs * 4
            data = bytes(tcp.payload)[:size]
            frames[number] = Frame(number, ip.src, ip.dst, tcp.sport, tcp.dport, int(tcp.flags), tcp.seq,
                                   mptcp_options(tcp), data if len(data) == size else None)
    return frames


def as_options(frames: dict[int, Frame]) -> dict[int, list[segments.Option]]:
    """Our scapy decode in the form the library compares (class name, field values, bytes)."""
    return {number: [option_of(o) for o in f.options] for number, f in frames.items()}


def bulk_options(pcap: Path) -> dict[int, list[segments.Option]]:
    """The bulk decoder's view of the same capture (what the cases judge and compare at run time)."""
    return {s.frame: s.options for s in segments.decode(pcap)}


def failure(what: str, agreement: Agreement, labels: dict[str, str]) -> str:
    shown = "\n  ".join(f"{labels.get(d.pcap, d.pcap)}: {d}" for d in agreement.disagreements[:MAX_SHOWN])
    more = agreement.disagreed - min(MAX_SHOWN, len(agreement.disagreements))
    return (f"{what}: {agreement.disagreed} disagreement(s) between our codec and tshark:\n  {shown}"
            + (f"\n  ... and {more} more" if more > 0 else ""))


# -- the live corpus, decoded by both ------------------------------------------------------------
@dataclass
class Decoded:
    corpus: Corpus
    ours: dict[Path, dict[int, Frame]]
    theirs: dict[Path, dict[int, dict[str, list[str]]]]
    tally: Agreement  # our scapy decode against tshark
    bulk: Agreement  # the bulk decoder (what cases compare) against tshark
    labels: dict[str, str]  # pcap path -> label naming scenario and transfer
    seconds: float


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    try:
        doctor.require("root", "socket:mptcp", "ip-mptcp", "tcpdump", "tshark", "mnexec", "ethtool", "qdisc:htb")
    except CapabilityMissing as exc:
        pytest.skip(f"this machine cannot build the corpus: {exc}")
    built = build_corpus(tmp_path_factory.mktemp("wire-corpus"))
    left = [n for n in our_netns() if n.startswith(f"{run_prefix()}-")]
    assert not left, f"the corpus labs left namespaces behind: {left}"
    return built


@pytest.fixture(scope="module")
def decoded(corpus: Corpus) -> Decoded:
    t0 = time.monotonic()
    pcaps = [p.path for p in corpus.endpoint_pcaps()]
    tally, bulk = Agreement(), Agreement()
    # tshark runs in other processes while this one decodes with scapy.
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {path: pool.submit(tshark_frames, path) for path in pcaps}
        ours = {path: decode_ours(path) for path in pcaps}
        theirs = {path: f.result() for path, f in futures.items()}
    labels = {}
    for p in corpus.endpoint_pcaps():
        labels[str(p.path)] = _label(corpus, p)
        tally.add(compare_frames(p.path, as_options(ours[p.path]), theirs[p.path], most=MAX_SHOWN))
        bulk.add(compare_frames(p.path, bulk_options(p.path), theirs[p.path], most=MAX_SHOWN))
    return Decoded(corpus, ours, theirs, tally, bulk, labels, time.monotonic() - t0)


def _label(corpus: Corpus, p: CorpusPcap) -> str:
    return f"{p.path.relative_to(corpus.folder)} ({p.transfer} transfer)"


def _write_summary(tmp_path: Path, name: str, data: dict) -> None:
    path = tmp_path / name
    path.write_text(json.dumps(data, indent=2, sort_keys=True))
    print(f"\n{name} ({path}):\n{json.dumps(data, indent=2, sort_keys=True)}")


def test_live_corpus_exercises_every_subtype(decoded: Decoded, tmp_path: Path):
    """The comparison cannot pass vacuously: the kernel sent every subtype and form listed."""
    corpus, tally = decoded.corpus, decoded.tally
    missing = [s for s in REQUIRED_SUBTYPES if not tally.per_subtype[s]]
    assert not missing, f"subtypes never seen in the live corpus: {missing} (seen: {dict(tally.per_subtype)})"
    forms = [f for f in REQUIRED_FORMS if not tally.forms[f]]
    assert not forms, f"forms never seen in the live corpus: {forms} (seen: {dict(tally.forms)})"
    dss = Counter(int(o.flags) for frames in decoded.ours.values() for f in frames.values()
                  for o in f.options if isinstance(o, DSS))
    assert any(flags & 0x10 for flags in dss), f"no DATA_FIN in the corpus (DSS flags seen: {dict(dss)})"
    assert any(isinstance(o, DSS) and o.checksum is not None for frames in decoded.ours.values()
               for f in frames.values() for o in f.options), "no DSS with a checksum in the corpus"
    families = {p.family for p in corpus.pcaps}
    assert families == {"ipv4", "ipv6"}, families
    _write_summary(tmp_path, "live-corpus.json", {
        "build_seconds": round(corpus.seconds, 1), "decode_compare_seconds": round(decoded.seconds, 1),
        "pcaps": [f"{p.scenario}/{p.transfer}/{p.intf}" for p in corpus.endpoint_pcaps()],
        "actions": corpus.actions, "dss_flags": {f"0x{k:02x}": n for k, n in sorted(dss.items())}})


def test_live_codec_agrees_with_tshark(decoded: Decoded, tmp_path: Path):
    """Every field tshark shows for every MPTCP option of every segment equals our decode, by our
    scapy classes and by the bulk decoder alike."""
    tally, bulk = decoded.tally, decoded.bulk
    _write_summary(tmp_path, "live-agreement.json", tally.summary())
    assert not tally.disagreed, failure("live corpus", tally, decoded.labels)
    assert sum(tally.per_subtype.values()) == sum(tally.per_subtype_agreed.values())
    assert tally.unchecked == 0
    assert not bulk.disagreed, failure("live corpus, bulk decoder", bulk, decoded.labels)
    assert (bulk.per_subtype, bulk.per_field, bulk.forms, bulk.fields) == \
           (tally.per_subtype, tally.per_field, tally.forms, tally.fields)


# -- synthetic packets ---------------------------------------------------------------------------
K1, K2 = 0x0123456789ABCDEF, 0xFEDCBA9876543210


def synthetic_options(salt: int) -> list[list[MPTCPOption]]:
    """One inner list per segment: every subtype, every form, every flag bit, extreme values.
    Every MP_CAPABLE key is new (salted): tshark shows token 0 for a key it already saw in
    another TCP stream of the capture."""
    out: list[list[MPTCPOption]] = []
    keys = iter(range(K1 + salt * 1000, K1 + salt * 1000 + 1000))
    for flags in (0x01, 0x81, 0x21, 0x41, 0x00, 0x1E, 0xFF):
        out += [[MPCapable(version=1, flags=flags)], [MPCapable(version=1, flags=flags, sender_key=next(keys))],
                [MPCapable(version=1, flags=flags, sender_key=next(keys), receiver_key=K2)],
                [MPCapable(version=1, flags=flags, sender_key=next(keys), receiver_key=K1, data_level_length=1)],
                [MPCapable(version=1, flags=flags, sender_key=next(keys), receiver_key=K2 - salt,
                           data_level_length=65535, checksum=0xBEEF)]]
    for flags in (0x81, 0x01, 0xFF):
        out += [[MPCapable(version=0, flags=flags, sender_key=next(keys))],
                [MPCapable(version=0, flags=flags, sender_key=next(keys), receiver_key=K2)]]
    for backup in (0, 1):
        for reserved in (0, 5):
            for addr_id in (0, 255):
                out += [[MPJoinSyn(reserved=reserved, backup=backup, address_id=addr_id,
                                   receiver_token=0xDEADBEEF, sender_random=0x01020304)],
                        [MPJoinSynAck(reserved=reserved, backup=backup, address_id=addr_id,
                                      sender_truncated_hmac=0x8877665544332211, sender_random=0xFFFFFFFF)]]
    out += [[MPJoinAck(reserved=r, sender_hmac=bytes(range(i, i + 20)))] for r, i in ((0, 0), (0xFFF, 200))]
    for flags in range(32):
        for checksum in ((None, 0xA5A5) if flags & 0x04 else (None,)):
            for reserved in (0, 0x7F):
                ack = (0xFFEEDDCCBBAA9988 if flags & 0x02 else 0xFFEEDDCC) if flags & 0x01 else None
                dsn = (0x1122334455667788 if flags & 0x08 else 0x11223344) if flags & 0x04 else None
                mapped = flags & 0x04
                out.append([DSS(reserved=reserved, flags=flags, data_ack=ack, dsn=dsn,
                                ssn=0x0A0B0C0D if mapped else None, data_level_length=1460 if mapped else None,
                                checksum=checksum)])
    out.append([DSS(flags="AMm", data_ack=1, dsn=2, ssn=0, data_level_length=0)])  # infinite mapping
    for address in ("198.51.100.7", "2001:db8::7"):
        for port in (None, 10100, 65535):
            for hmac in (None, 0x0102030405060708):
                for echo in (0, 1):
                    out.append([AddAddr(reserved=7 if port == 65535 else 0, echo=echo, address_id=9,
                                        address=address, port=port, truncated_hmac=hmac)])
    out += [[RemoveAddr(address_ids=ids, reserved=r)] for ids, r in (([0], 0), ([1, 2], 0xF), ([255, 0, 7, 8], 0))]
    out += [[MPPrio(reserved=r, backup=b, address_id=a)] for r in (0, 7) for b in (0, 1) for a in (None, 3)]
    out += [[MPFail(reserved=r, dsn=d)] for r, d in ((0, 0), (0xFFF, 2**64 - 1))]
    out += [[MPFastclose(reserved=r, receiver_key=k)] for r, k in ((0, K1), (0xABC, K2))]
    out += [[MPTCPRst(flags=f, reason=r)] for f in range(16) for r in (*range(7), 0x7F, 0xFF)]
    out += [[MPExperimental(rest=5, data=b"")], [MPExperimental(rest=0, data=b"xyz")]]
    out += [[MPTCPUnknown(subtype=s, rest=s & 0xF, data=b"\x01\x02")] for s in range(9, 15)]
    # Several options in one segment: tshark's flattened lists must split back in option order.
    out += [[DSS(flags="AM", data_ack=5, dsn=6, ssn=7, data_level_length=8),
             AddAddr(address_id=1, address="192.0.2.1", truncated_hmac=K1)],
            [DSS(flags="A", data_ack=5), RemoveAddr(address_ids=[4, 5]), MPPrio(backup=1)],
            [MPPrio(backup=1, address_id=6), RemoveAddr(address_ids=[7, 8, 9]),
             AddAddr(echo=1, address_id=10, address="192.0.2.2", port=80)],
            [MPFastclose(receiver_key=K2), MPTCPRst(flags="T", reason=1)],
            [DSS(flags="AaMmF", data_ack=1, dsn=2, ssn=3, data_level_length=4)]]
    return out


def synthetic_packets() -> list[tuple[Ether, list[MPTCPOption]]]:
    """Every option set in an IPv4 and an IPv6 segment, each in a TCP stream of its own (tshark's
    MPTCP analysis keeps state per stream), with the options each was built from."""
    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")  # explicit: no neighbour lookup
    out = []
    for salt, ip in enumerate((IP(src="192.0.2.1", dst="192.0.2.2"), IPv6(src="2001:db8::1", dst="2001:db8::2"))):
        for i, opts in enumerate(synthetic_options(salt)):
            tcp = TCP(sport=1024 + i, dport=80, flags="A", seq=1000 + i, ack=1, options=list(opts))
            out.append((eth / ip / tcp, opts))
    return out


def test_synthetic_codec_agrees_with_tshark(tmp_path: Path):
    """Packets of every subtype and field combination, built with our classes: our decode of the
    written pcap equals what we built, and tshark shows the same values."""
    packets = synthetic_packets()
    pcap = tmp_path / "synthetic.pcap"
    wrpcap(str(pcap), [pkt for pkt, _ in packets])
    ours, theirs = decode_ours(pcap), tshark_frames(pcap)
    assert len(ours) == len(packets)
    roundtrip = []
    for number, frame in ours.items():
        built = packets[number - 1][1]
        if [type(o) for o in frame.options] != [type(o) for o in built] or \
                [bytes(o) for o in frame.options] != [bytes(o) for o in built]:
            roundtrip.append(f"frame {number}: built {built!r} ({[bytes(o).hex() for o in built]}), "
                             f"decoded {frame.options!r}")
            continue
        for b, d in zip(built, frame.options, strict=True):
            for name, value in b.fields.items():
                if name != "length" and value is not None and d.getfieldval(name) != value:
                    roundtrip.append(f"frame {number}: {subtype_name(option_of(b))} {name} built {value!r}, "
                                     f"decoded {d.getfieldval(name)!r}")
    assert not roundtrip, "build/dissect round trip:\n  " + "\n  ".join(roundtrip[:MAX_SHOWN])
    tally = compare_frames(pcap, as_options(ours), theirs, most=MAX_SHOWN)
    _write_summary(tmp_path, "synthetic-agreement.json", tally.summary())
    assert not tally.disagreed, tally.failure("synthetic packets")
    assert {s for s in tally.per_subtype} >= {*REQUIRED_SUBTYPES, "MP_FAIL", "MP_EXPERIMENTAL"}
    assert sum(tally.per_subtype.values()) == sum(tally.per_subtype_agreed.values()) == \
           sum(len(opts) for _, opts in packets)
    assert tally.blind["DSS checksum"] > 0 and tally.unchecked == 0
    # The run-time path (bulk decoder, its own tshark run) finds the same.
    bulk = compare(pcap, most=MAX_SHOWN)
    assert not bulk.disagreed, bulk.failure("synthetic packets, bulk decoder")
    assert (bulk.per_subtype, bulk.per_field, bulk.fields) == (tally.per_subtype, tally.per_field, tally.fields)


# -- cryptography against the kernel -------------------------------------------------------------
@dataclass
class Connection:
    keys: dict[tuple[str, int], int]  # (address, port) of each end of the initial subflow -> its key
    client_key: int
    server_key: int


@dataclass
class CryptoReport:
    counts: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str, detail: str) -> None:
        self.counts[what if ok else f"FAILED {what}"] += 1
        if not ok:
            self.failures.append(f"{what}: {detail}")


def _subflows(frames: Iterable[Frame]) -> dict[frozenset, list[Frame]]:
    out: dict[frozenset, list[Frame]] = {}
    for f in frames:
        out.setdefault(frozenset({(f.src, f.sport), (f.dst, f.dport)}), []).append(f)
    return out


def _first(frames: list[Frame], cls: type, *, syn: bool | None = None, ack: bool | None = None,
           src: tuple | None = None) -> tuple[Frame, MPTCPOption] | None:
    for f in frames:
        if (syn is not None and f.has("S") != syn) or (ack is not None and f.has("A") != ack):
            continue
        if src is not None and (f.src, f.sport) != src:
            continue
        for o in f.options:
            if isinstance(o, cls):
                return f, o
    return None


def _expand_dsn(dsn32: int, idsn: int) -> int:
    """A 32-bit DSN as the 64-bit one closest to the sender's initial DSN (RFC 8684 §3.3)."""
    base = (idsn & ~0xFFFFFFFF) | dsn32
    return min(((base + d) % 2**64 for d in (-(2**32), 0, 2**32)),
               key=lambda x: min((x - idsn) % 2**64, (idsn - x) % 2**64))


def analyse_crypto(frames: list[Frame], tshark: dict[int, dict[str, list[str]]], reports: dict[str, dict],
                   label: str, rep: CryptoReport, checksums: bool) -> None:
    """All checks on one transfer, seen from one host's captures (every subflow once)."""
    subflows = _subflows(frames)
    conns: list[Connection] = []
    by_token: dict[int, tuple[Connection, tuple[str, int]]] = {}
    keys: dict[tuple[str, int, str, int], tuple[int, int]] = {}  # direction -> (sender key, receiver key)

    # MP_CAPABLE handshakes: keys, tokens and IDSNs.
    for sf in subflows.values():
        syn = _first(sf, MPCapable, syn=True, ack=False)
        if syn is None:
            continue
        client = (syn[0].src, syn[0].sport)
        server = (syn[0].dst, syn[0].dport)
        synack = _first(sf, MPCapable, syn=True, ack=True, src=server)
        ack = _first(sf, MPCapable, syn=False, src=client)
        if synack is None or ack is None:
            rep.incomplete.append(f"{label}: MP_CAPABLE handshake {client}->{server} without SYN/ACK or ACK")
            continue
        server_key, client_key = synack[1].sender_key, ack[1].sender_key
        rep.check(ack[1].receiver_key == server_key, "MP_CAPABLE ACK echoes the SYN/ACK key",
                  f"{label} frame {ack[0].number}: {ack[1].receiver_key:#x} != {server_key:#x}")
        for frame, key in ((synack[0], server_key), (ack[0], client_key)):
            layers = tshark[frame.number]
            rep.check(layers.get(TOKEN) == [str(crypto.token(key))], "token(key) == tshark mptcp.expected_token",
                      f"{label} frame {frame.number}: key {key:#x}: ours {crypto.token(key)}, "
                      f"tshark {layers.get(TOKEN)}")
            if IDSN in layers:
                rep.check(layers[IDSN] == [str(crypto.idsn(key))], "idsn(key) == tshark mptcp.expected_idsn",
                          f"{label} frame {frame.number}: key {key:#x}: ours {crypto.idsn(key)}, "
                          f"tshark {layers[IDSN]}")
        conn = Connection({client: client_key, server: server_key}, client_key, server_key)
        conns.append(conn)
        by_token[crypto.token(client_key)] = (conn, client)
        by_token[crypto.token(server_key)] = (conn, server)
        keys[(*client, *server)] = (client_key, server_key)
        keys[(*server, *client)] = (server_key, client_key)
        rep.counts["MP_CAPABLE handshakes"] += 1
    # The kernel's own token (MPTCP_INFO) of each end is the token of the key it sent. The view
    # taken mid-transfer first: once the peer has fast-closed the connection the token reads 0.
    for role, report in reports.items():
        info = report.get("mptcp_info_mid") or report.get("mptcp_info")
        if info and len(conns) == 1:
            key = conns[0].client_key if role == "client" else conns[0].server_key
            rep.check(info["token"] == f"{crypto.token(key):08x}", "kernel MPTCP_INFO token == token(key)",
                      f"{label} {role}: kernel {info['token']}, ours {crypto.token(key):08x}")

    # MP_JOIN handshakes: the token names the connection, the HMACs follow from keys and nonces.
    for sf in subflows.values():
        syn = _first(sf, MPJoinSyn, syn=True, ack=False)
        if syn is None:
            continue
        initiator, responder = (syn[0].src, syn[0].sport), (syn[0].dst, syn[0].dport)
        synack = _first(sf, MPJoinSynAck, syn=True, ack=True, src=responder)
        ack = _first(sf, MPJoinAck, syn=False, src=initiator)
        found = by_token.get(syn[1].receiver_token)
        if found is None or synack is None or ack is None:
            rep.incomplete.append(f"{label}: MP_JOIN {initiator}->{responder}: token known {found is not None}, "
                                  f"SYN/ACK {synack is not None}, ACK {ack is not None}")
            continue
        conn, owner = found
        responder_key = conn.keys[owner]
        initiator_key = conn.client_key if responder_key == conn.server_key else conn.server_key
        r_a, r_b = syn[1].sender_random, synack[1].sender_random
        want = crypto.join_synack_hmac(responder_key, initiator_key, r_b, r_a)
        rep.check(synack[1].sender_truncated_hmac == want, "MP_JOIN SYN/ACK truncated HMAC",
                  f"{label} frame {synack[0].number}: wire {synack[1].sender_truncated_hmac:#x}, ours {want:#x}")
        full = crypto.join_hmac(initiator_key, responder_key, r_a, r_b)[:20]
        rep.check(bytes(ack[1].sender_hmac) == full, "MP_JOIN ACK HMAC (160 bits)",
                  f"{label} frame {ack[0].number}: wire {bytes(ack[1].sender_hmac).hex()}, ours {full.hex()}")
        keys[(*initiator, *responder)] = (initiator_key, responder_key)
        keys[(*responder, *initiator)] = (responder_key, initiator_key)

    # ADD_ADDR HMACs and MP_FASTCLOSE keys, on whichever subflow they travel.
    for f in frames:
        for o in f.options:
            pair = keys.get(f.direction)
            if isinstance(o, AddAddr) and o.truncated_hmac is not None:
                if pair is None:
                    rep.incomplete.append(f"{label} frame {f.number}: ADD_ADDR on a subflow of unknown keys")
                    continue
                addr = ipaddress.ip_address(o.address)
                want = crypto.add_addr_hmac(pair[0], pair[1], o.address_id, addr.packed, o.port)
                rep.check(o.truncated_hmac == want,
                          f"ADD_ADDR HMAC IPv{addr.version} {'with' if o.port else 'without'} port",
                          f"{label} frame {f.number}: wire {o.truncated_hmac:#x}, ours {want:#x}")
            elif isinstance(o, MPFastclose) and pair is not None:
                rep.check(o.receiver_key == pair[1], "MP_FASTCLOSE carries the receiver's key",
                          f"{label} frame {f.number}: {o.receiver_key:#x} != {pair[1]:#x}")
    if checksums:
        _check_dss_checksums(frames, subflows, keys, label, rep)


def _check_dss_checksums(frames: list[Frame], subflows: dict[frozenset, list[Frame]],
                         keys: dict[tuple[str, int, str, int], tuple[int, int]], label: str,
                         rep: CryptoReport) -> None:
    """Recompute every mapping's DSS checksum over its payload, reassembled by subflow sequence."""
    for sf in subflows.values():
        isn: dict[tuple, int] = {f.direction: f.seq for f in sf if f.has("S")}
        # A reset subflow (REMOVE_ADDR, fastclose) may never carry the rest of a mapping; anywhere
        # else a gap means the reassembly (or the capture) is wrong.
        reset = any(f.has("R") for f in sf)
        data: dict[tuple, bytearray] = {}
        have: dict[tuple, bytearray] = {}
        mappings: set[tuple] = set()
        for f in sf:
            if f.direction not in isn:
                continue
            if f.payload:
                rel = (f.seq - isn[f.direction]) % 2**32
                buf = data.setdefault(f.direction, bytearray())
                got = have.setdefault(f.direction, bytearray())
                end = rel + len(f.payload)
                if len(buf) < end:
                    buf.extend(bytes(end - len(buf)))
                    got.extend(bytes(end - len(got)))
                buf[rel:end] = f.payload
                got[rel:end] = b"\x01" * len(f.payload)
            pair = keys.get(f.direction)
            for o in f.options:
                if pair is None:
                    continue
                if isinstance(o, DSS) and o.checksum is not None and o.data_level_length:
                    dsn = o.dsn if int(o.flags) & 0x08 else _expand_dsn(o.dsn, crypto.idsn(pair[0]))
                    mappings.add((f.direction, dsn, o.ssn, o.data_level_length, bool(int(o.flags) & 0x10),
                                  o.checksum, "DSS", f.number))
                elif isinstance(o, MPCapable) and o.checksum is not None:
                    # §3.1: MP_CAPABLE with data maps the first data: DSN = IDSN + 1, SSN 1.
                    dsn = (crypto.idsn(pair[0]) + 1) % 2**64
                    mappings.add((f.direction, dsn, 1, o.data_level_length, False, o.checksum, "MP_CAPABLE",
                                  f.number))
        seen: set[tuple] = set()
        for direction, dsn, ssn, dll, fin, checksum, kind, number in sorted(mappings, key=lambda m: m[7]):
            if (direction, dsn, ssn, dll, checksum) in seen:
                continue  # the same mapping on the next segment, or retransmitted
            seen.add((direction, dsn, ssn, dll, checksum))
            size = dll - 1 if fin else dll  # §3.3.1: DATA_FIN takes a DSN but no subflow byte
            got = have.get(direction, bytearray())
            if size and (ssn + size > len(got) or not all(got[ssn:ssn + size])):
                missing = f"{label} frame {number}: {kind} mapping ssn {ssn} dll {dll}: payload not all captured"
                if reset:
                    rep.incomplete.append(f"{missing} (the subflow was reset)")
                else:
                    rep.check(False, "mapped payload captured in full on a subflow never reset", missing)
                continue
            payload = bytes(data.get(direction, bytearray())[ssn:ssn + size])
            want = crypto.dss_checksum(dsn, ssn, dll, payload)
            rep.check(want == checksum, f"{kind} checksum{' (DATA_FIN)' if fin else ''} over the mapped payload",
                      f"{label} frame {number}: dsn {dsn:#x} ssn {ssn} dll {dll}: wire {checksum:#06x}, "
                      f"ours {want:#06x}")


def test_crypto_against_the_kernel(decoded: Decoded, tmp_path: Path):
    """Tokens, IDSNs, MP_JOIN and ADD_ADDR HMACs, MP_FASTCLOSE keys and DSS checksums the kernel
    sent equal what conformance.wire.crypto computes."""
    rep = CryptoReport()
    corpus = decoded.corpus
    groups: dict[str, list] = {}
    for p in corpus.endpoint_pcaps():
        groups.setdefault(f"{p.scenario}/{p.transfer}", []).append(p)
    for name, pcaps in groups.items():
        # The client is single-homed here: its capture holds every subflow exactly once.
        client = [p for p in pcaps if p.node == "c1"]
        assert len(client) == 1, f"{name}: expected one client interface, got {[p.intf for p in client]}"
        p = client[0]
        tr = corpus.runs[name]
        frames = sorted(decoded.ours[p.path].values(), key=lambda f: f.number)
        analyse_crypto(frames, decoded.theirs[p.path], {"client": tr.client, "server": tr.server},
                       _label(corpus, p), rep, checksums=p.checksum and p.full_payload)
    _write_summary(tmp_path, "crypto.json", {"verified": dict(rep.counts), "incomplete": rep.incomplete[:50],
                                             "failures": rep.failures[:50]})
    assert not rep.failures, "cryptography disagrees with the kernel:\n  " + "\n  ".join(rep.failures[:MAX_SHOWN])
    c = rep.counts
    for what in ("MP_CAPABLE handshakes", "token(key) == tshark mptcp.expected_token",
                 "idsn(key) == tshark mptcp.expected_idsn", "kernel MPTCP_INFO token == token(key)",
                 "MP_JOIN SYN/ACK truncated HMAC", "MP_JOIN ACK HMAC (160 bits)",
                 "ADD_ADDR HMAC IPv4 without port", "ADD_ADDR HMAC IPv4 with port",
                 "ADD_ADDR HMAC IPv6 without port", "ADD_ADDR HMAC IPv6 with port",
                 "MP_FASTCLOSE carries the receiver's key", "DSS checksum over the mapped payload",
                 "MP_CAPABLE checksum over the mapped payload"):
        assert c[what] > 0, f"nothing verified for {what!r} (counts: {dict(c)})"
    assert c["MP_JOIN SYN/ACK truncated HMAC"] == c["MP_JOIN ACK HMAC (160 bits)"]
    joins = sum(1 for i in rep.incomplete if "MP_JOIN" in i)
    assert joins == 0, f"MP_JOIN handshakes that could not be verified: {rep.incomplete}"
