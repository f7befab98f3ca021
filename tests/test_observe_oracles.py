"""conformance.observe.oracles without a topology: synthetic captures written with scapy, compared
by the library's compare() (our bulk decoder against tshark), and a tshark decode corrupted on
purpose, which must come back as a Disagreement naming the frame and the field.

The live kernel corpus and every field combination are in tests/test_wire_oracles.py (root)."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

import conformance.wire  # noqa: F401  (scapy's TCP layer builds our MPTCP options from here on)
from conformance.errors import InputError
from conformance.observe import oracles
from conformance.observe.oracles import IDSN, TOKEN, Agreement, Disagreement, P, compare, tshark_view
from conformance.wire import bulk, crypto
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
    parse_option,
)

needs_tshark = pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")

K1, K2 = 0x0123456789ABCDEF, 0xFEDCBA9876543210
# One inner list per segment (each in a TCP stream of its own: tshark's MPTCP analysis keeps state
# per stream, and shows token 0 for a key it saw in another stream). Frame numbers start at 1.
SEGMENTS: list[list[MPTCPOption]] = [
    [MPCapable(version=1, flags=0x81)],  # 1: SYN, 4 bytes
    [MPCapable(version=1, flags=0x01, sender_key=K1)],  # 2: SYN/ACK: tshark's token and IDSN of the key
    [MPCapable(version=1, flags=0x01, sender_key=K1 + 1, receiver_key=K2)],  # 3
    [MPCapable(version=1, flags=0x81, sender_key=K1 + 2, receiver_key=K2, data_level_length=100,
               checksum=0x1234)],  # 4
    [MPCapable(version=0, flags=0x81, sender_key=K1 + 3)],  # 5: RFC 6824 flags
    [MPJoinSyn(backup=1, address_id=2, receiver_token=0xDEADBEEF, sender_random=7)],  # 6
    [MPJoinSynAck(reserved=5, address_id=2, sender_truncated_hmac=0x1122334455667788, sender_random=9)],  # 7
    [MPJoinAck(sender_hmac=bytes(range(20)))],  # 8
    [DSS(flags="AaMm", data_ack=2**64 - 1, dsn=2**63, ssn=5, data_level_length=1400, checksum=0xBEEF)],  # 9
    [DSS(reserved=0x7F, flags="AMF", data_ack=1, dsn=2, ssn=3, data_level_length=4)],  # 10
    [AddAddr(address_id=3, address="198.51.100.7", port=10100, truncated_hmac=K1)],  # 11
    [AddAddr(echo=1, address_id=4, address="2001:db8::7")],  # 12
    [RemoveAddr(address_ids=[1, 2, 3])],  # 13
    [MPPrio(backup=1), MPPrio(backup=0, address_id=5)],  # 14: two of one subtype
    [MPFail(dsn=12345)],  # 15
    [MPFastclose(receiver_key=K2), MPTCPRst(flags="TU", reason=1)],  # 16
    [MPExperimental(rest=1, data=b"ab")],  # 17
    [MPTCPUnknown(subtype=9, rest=0, data=b"\x01")],  # 18
    [AddAddr(address_id=1, address="192.0.2.1", truncated_hmac=K1),
     AddAddr(address_id=2, address="192.0.2.3", truncated_hmac=K2)],  # 19: two ADD_ADDR
    [DSS(flags="A", data_ack=5), DSS(flags="A", data_ack=6)],  # 20: two DSS
    [RemoveAddr(address_ids=[7]), RemoveAddr(address_ids=[8, 9])],  # 21: two REMOVE_ADDR
    [DSS(flags="AM", data_ack=5, dsn=6, ssn=7, data_level_length=8),
     AddAddr(address_id=1, address="192.0.2.1", truncated_hmac=K1)],  # 22
]
ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")  # explicit: no neighbour lookup


def _packets(segments: list[list], *, v6: bool = False) -> list:
    ip = IPv6(src="2001:db8::1", dst="2001:db8::2") if v6 else IP(src="192.0.2.1", dst="192.0.2.2")
    return [ETH / ip / TCP(sport=1024 + i, dport=80, flags="A", seq=1000 + i, ack=1, options=list(opts))
            for i, opts in enumerate(segments)]


@pytest.fixture(scope="module")
def pcap(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("oracles") / "synthetic.pcap"
    wrpcap(str(path), _packets(SEGMENTS))
    return path


@pytest.fixture(scope="module")
def tshark_decode(pcap: Path) -> dict[int, dict[str, list[str]]]:
    if shutil.which("tshark") is None:
        pytest.skip("tshark is not installed")
    return oracles.tshark_frames(pcap)


@pytest.fixture
def corrupt(monkeypatch: pytest.MonkeyPatch, tshark_decode) -> Callable:
    """corrupt(change) makes compare() see tshark's decode as change(frames) leaves it."""

    def install(change: Callable[[dict[int, dict[str, list[str]]]], None]) -> None:
        def corrupted(pcap):
            frames = copy.deepcopy(tshark_decode)
            change(frames)
            return frames

        monkeypatch.setattr(oracles, "tshark_frames", corrupted)

    return install


# -- tshark_view, no tshark needed ---------------------------------------------------------------
def test_view_from_scapy_and_bulk_fields_is_the_same():
    """The view works from (class name, fields): the bulk decoder's and our scapy classes' fields
    give the same expected tshark values for every option."""
    for segment in SEGMENTS:
        for built in segment:
            raw = bytes(built)
            opt = oracles.option_of(parse_option(raw))
            cls, fields = bulk.decode_option(raw)
            assert (opt.cls, opt.raw) == (cls, raw)
            assert tshark_view(opt.cls, opt.fields) == tshark_view(cls, fields), built


def test_view_values_in_tshark_notation():
    cls, fields = bulk.decode_option(bytes(DSS(flags="AMF", data_ack=1, dsn=2, ssn=3, data_level_length=4,
                                               checksum=0xAB)))
    assert tshark_view(cls, fields) == {
        P + "subtype": ["2"], P + "flags": ["0x15"], P + "datafin.flag": ["1"], P + "dseqn8.flag": ["0"],
        P + "dseqnpresent.flag": ["1"], P + "dataack8.flag": ["0"], P + "dataackpresent.flag": ["1"],
        P + "rawdataack": ["1"], P + "rawdataseqno": ["2"], P + "subflowseqno": ["3"], P + "datalvllen": ["4"],
        P + "checksum": ["0x00ab"]}
    cls, fields = bulk.decode_option(bytes(MPCapable(version=1, flags=0xA1, sender_key=K1)))
    view = tshark_view(cls, fields)
    assert view[P + "flags"] == ["0xa1"] and view[P + "checksumreq.flags"] == ["1"]
    assert view[P + "nomoresubflows.flag"] == ["1"] and view[P + "reserved.flag"] == ["0x00"]
    assert view[TOKEN] == [str(crypto.token(K1))] and view[IDSN] == [str(crypto.idsn(K1))]
    cls, fields = bulk.decode_option(bytes(RemoveAddr(address_ids=[4, 5])))
    assert tshark_view(cls, fields) == {P + "subtype": ["4"], P + "addrid": ["4", "5"],
                                        "mptcp.rm_addr.count": ["2"]}
    assert tshark_view(*bulk.decode_option(bytes([30, 5, 0x01, 0x81, 0]))) is None  # malformed
    with pytest.raises(ValueError, match="no tshark view"):
        tshark_view("NoSuchOption", {"subtype": 0})


def test_disagreement_reads_as_frame_field_and_both_values():
    d = Disagreement("/x/y/c1-eth0.pcap", 7, f"field {P}rawdataack", ["5"], ["6"], P + "rawdataack",
                     "#1 DSS 1e080201")
    assert str(d) == (f"c1-eth0.pcap frame 7: field {P}rawdataack: our codec ['5'], tshark ['6'] "
                      "(option #1 DSS 1e080201)")


def test_agreements_add_up():
    a = Agreement(options=2, fields=10, pcaps=1, disagreed=1, disagreements=[Disagreement("p", 1, "w", 1, 2)])
    a.per_subtype["DSS"] += 2
    b = Agreement(options=1, fields=3, pcaps=1)
    b.per_subtype["DSS"] += 1
    b.per_field["DSS flags"] += 1
    assert a.add(b) is a
    assert (a.options, a.fields, a.pcaps, a.disagreed, len(a.disagreements)) == (3, 13, 2, 1, 1)
    assert a.per_subtype == {"DSS": 3} and a.per_field == {"DSS flags": 1}
    assert a.summary()["per_subtype"] == {"DSS": {"options": 3, "all_fields_agree": 0}}
    assert "1 disagreement(s)" in a.failure("x") and "p frame 1: w" in a.failure("x")


# -- compare() against tshark ---------------------------------------------------------------------
@needs_tshark
def test_compare_agrees_on_every_subtype(pcap: Path):
    agreement = compare(pcap)
    assert not agreement.disagreements, agreement.failure("synthetic")
    n = sum(len(s) for s in SEGMENTS)
    assert agreement.options == n and agreement.frames == len(SEGMENTS) and agreement.pcaps == 1
    assert agreement.per_subtype == agreement.per_subtype_agreed == {
        "MP_CAPABLE": 5, "MP_JOIN": 3, "DSS": 5, "ADD_ADDR": 5, "REMOVE_ADDR": 3, "MP_PRIO": 2, "MP_FAIL": 1,
        "MP_FASTCLOSE": 1, "MP_TCPRST": 1, "MP_EXPERIMENTAL": 1, "unknown subtype 9": 1}
    assert agreement.forms["MP_JOIN/24"] == 1 and agreement.forms["ADD_ADDR/16"] == 3
    # Several options of one subtype in a segment: every value compared, in option order.
    assert agreement.per_field["ADD_ADDR addrid"] == 5 and agreement.per_field["REMOVE_ADDR addrid"] == 6
    assert agreement.per_field["DSS rawdataack"] == 5 and agreement.per_field["MP_PRIO backup.flag"] == 2
    assert agreement.per_field["MP_PRIO addrid"] == 1 and agreement.per_field["MP_TCPRST flag_U.flag"] == 1
    # Every flag bit tshark has, not only the flags byte.
    assert agreement.per_field["MP_CAPABLE sha256.flag"] == 4 and agreement.per_field["MP_CAPABLE sha1.flag"] == 1
    assert agreement.blind == {"DSS checksum": 1}  # tshark 4.0 never shows it
    assert agreement.per_field["MP_CAPABLE checksum"] == 1
    assert agreement.crypto["MP_CAPABLE mptcp.expected_token"] >= 3
    assert agreement.unchecked == 0
    # Every value compared is counted once: as agreeing per field (lengths included) or as a crypto value.
    assert agreement.fields == sum(agreement.per_field.values()) + sum(agreement.crypto.values()) > 6 * n


@needs_tshark
def test_compare_agrees_over_ipv6(tmp_path: Path):
    path = tmp_path / "v6.pcap"
    wrpcap(str(path), _packets(SEGMENTS, v6=True))
    agreement = compare(path)
    assert not agreement.disagreements, agreement.failure("synthetic IPv6")
    assert agreement.options == sum(len(s) for s in SEGMENTS)


@needs_tshark
def test_a_corrupted_field_is_a_disagreement_naming_frame_and_field(pcap: Path, corrupt):
    def change(frames):
        frames[9][P + "rawdataack"] = ["42"]

    corrupt(change)
    agreement = compare(pcap)
    assert agreement.disagreed == 1, agreement.failure("corrupted")
    d = agreement.disagreements[0]
    assert (d.frame, d.field) == (9, P + "rawdataack")
    assert (d.ours, d.theirs) == ([str(2**64 - 1)], ["42"])
    text = str(d)
    assert text.startswith("synthetic.pcap frame 9: ") and "rawdataack" in text
    assert str(2**64 - 1) in text and "'42'" in text and "DSS" in text
    assert agreement.per_subtype["DSS"] == 5 and agreement.per_subtype_agreed["DSS"] == 4


@needs_tshark
def test_a_corrupted_value_in_the_second_option_of_a_subtype(pcap: Path, corrupt):
    def change(frames):
        frames[19][P + "addrid"] = ["1", "9"]

    corrupt(change)
    agreement = compare(pcap)
    assert agreement.disagreed == 1
    d = agreement.disagreements[0]
    assert (d.frame, d.field, d.ours, d.theirs) == (19, P + "addrid", ["1", "2"], ["1", "9"])
    assert "#1 ADD_ADDR" in d.options and "#2 ADD_ADDR" in d.options


@needs_tshark
@pytest.mark.parametrize(("frame", "change", "field"), [
    (2, lambda layers: layers.pop(P + "sendkey"), P + "sendkey"),  # tshark lost a field
    (6, lambda layers: layers.__setitem__(P + "echo", ["1"]), P + "echo"),  # a field no view predicts
    (5, lambda layers: layers.__setitem__(P + "sha1.flag", ["0"]), P + "sha1.flag"),  # one flag bit
    (16, lambda layers: layers.__setitem__(P + "flag_T.flag", ["0"]), P + "flag_T.flag"),
    (12, lambda layers: layers.__setitem__(P + "ipv6", ["2001:db8::8"]), P + "ipv6"),
    (2, lambda layers: layers.__setitem__(TOKEN, ["1"]), TOKEN),  # tshark's token of the key
    (9, lambda layers: layers.__setitem__(P + "checksum", ["0x0001"]), P + "checksum"),  # blind, but wrong
    (14, lambda layers: layers.__setitem__("tcp.option_len", ["4", "3"]), "tcp.option_len"),
])
def test_every_kind_of_corruption_is_reported(pcap: Path, corrupt, frame: int, change, field: str):
    corrupt(lambda frames: change(frames[frame]))
    agreement = compare(pcap)
    assert [(d.frame, d.field) for d in agreement.disagreements] == [(frame, field)], agreement.failure("x")
    assert f"frame {frame}: " in str(agreement.disagreements[0])


@needs_tshark
def test_a_segment_only_one_side_decoded(pcap: Path, corrupt):
    corrupt(lambda frames: frames.pop(11))
    agreement = compare(pcap)
    assert [(d.frame, d.what, d.ours, d.theirs) for d in agreement.disagreements] == \
           [(11, "TCP segment with MPTCP options", "decoded", "not decoded")]
    assert "ADD_ADDR" in agreement.disagreements[0].options


@needs_tshark
def test_most_caps_the_list_not_the_count(pcap: Path, corrupt):
    def change(frames):
        for layers in frames.values():
            layers[P + "subtype"] = ["15"] * len(layers[P + "subtype"])

    corrupt(change)
    agreement = compare(pcap, most=3)
    assert len(agreement.disagreements) == 3 and agreement.disagreed == len(SEGMENTS) - 1  # 17 is subtype 15
    assert [d.frame for d in agreement.disagreements] == [1, 2, 3]
    assert "... and" in agreement.failure("x", shown=2)


@needs_tshark
def test_malformed_options_are_compared_by_length_only(tmp_path: Path):
    path = tmp_path / "malformed.pcap"
    wrpcap(str(path), [ETH / IP(src="192.0.2.1", dst="192.0.2.2") / TCP(sport=1, dport=80, flags="A",
                                                                        options=[(30, b"\x01\x81\x00")]),
                       ETH / IP(src="192.0.2.1", dst="192.0.2.2") / TCP(
                           sport=2, dport=80, flags="A", options=[DSS(flags="A", data_ack=1), (30, b"\x20")])])
    agreement = compare(path)
    assert not agreement.disagreements, agreement.failure("malformed")
    assert agreement.unchecked == 3 and agreement.per_subtype == {"malformed": 2, "DSS": 1}
    assert not agreement.per_subtype_agreed


@needs_tshark
def test_a_pcap_without_mptcp(tmp_path: Path):
    path = tmp_path / "tcp.pcap"
    wrpcap(str(path), [ETH / IP(src="192.0.2.1", dst="192.0.2.2") / TCP(options=[("MSS", 1460), ("NOP", None),
                                                                                 ("SAckOK", b"")])])
    agreement = compare(path)
    assert (agreement.frames, agreement.options, agreement.disagreed) == (1, 0, 0)


def test_a_missing_capture_is_an_input_error(tmp_path: Path):
    with pytest.raises(InputError, match="no such capture"):
        compare(tmp_path / "nothing.pcap")
