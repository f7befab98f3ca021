"""conformance.observe.tshark_analysis: tshark's MPTCP analysis against the passive rules.

For every TABLE entry: a capture with the defect, where tshark's analysis and our rule both flag it
(no disagreement), a correct capture (no disagreement), and judgment lists made wrong on purpose,
which must come back as disagreements naming the rule, the frames and tshark's message. The
captures are written with scapy and our option classes, with real TCP sequence numbers (tshark's
mapping analysis works on them). Last, a live kernel-to-kernel corpus (root) must show no
disagreement, with every kind of evidence exercised."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap
from test_observe_model import C1, C2, KEY_C, KEY_S, R_C, R_S, S

import conformance.wire  # noqa: F401  (scapy's TCP layer builds our MPTCP options from here on)
from conformance.errors import InputError
from conformance.observe import tshark_analysis as ta
from conformance.observe.model import Where
from conformance.observe.rules import FAIL, PASS, Judgment, check
from conformance.proc import run
from conformance.requirements import load_catalogue
from conformance.wire import DSS, MPCapable, MPJoinAck, MPJoinSyn, MPJoinSynAck, crypto

pytestmark = pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")

ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")  # explicit: no neighbour lookup
ISN_C, ISN_S, ISN_JC, ISN_JS = 1000, 5000, 7000, 9000
IDSN_C, IDSN_S = crypto.idsn(KEY_C), crypto.idsn(KEY_S)


def _seg(src: str, dst: str, sport: int, dport: int, flags: str, opts: list, seq: int, ack: int,
         data: bytes = b"") -> object:
    return ETH / IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack,
                                            options=opts) / data


def flow(*, syn_flags: int = 0x01, third_ack_key: int | None = None, first_data_key: int = KEY_S,
         first_mapping: str = "mp_capable", second: str = "", join_token: int | None = None,
         version: int = 1) -> list:
    """One correct MPTCP connection, unless told otherwise: a v1 handshake (no checksums), the
    initiator's first 100 bytes in MP_CAPABLE with data, 100 more with a DSS mapping (SSN 101, DSN
    IDSN+101), a join with valid HMACs carrying 50 bytes, each data segment Data-ACKed.

    syn_flags: the SYN's MP_CAPABLE flags. third_ack_key: send a 20-byte third ACK echoing this
    listener key. first_data_key: the listener key the MP_CAPABLE with data echoes.
    first_mapping: "mp_capable", or "none" (a DSS without mapping). second: "" (correct), "off"
    (the mapping's SSN misses its segment), "dsn+7" (mapped 7 past IDSN+101), "conflict" (then
    one more segment re-maps part of it to another DSN), "infinite" (an infinite mapping, then a
    segment with no mapping). join_token: the join SYN's token (default: the listener's).
    version: 0 for RFC 6824 MP_CAPABLE options (keys on the SYN)."""
    key_on_syn = {"sender_key": KEY_C} if version == 0 else {}
    p = [_seg(C1, S, 40000, 80, "S", [MPCapable(version=version, flags=syn_flags, **key_on_syn)], ISN_C, 0),
         _seg(S, C1, 80, 40000, "SA", [MPCapable(version=version, flags=0x01, sender_key=KEY_S)], ISN_S,
              ISN_C + 1)]
    c, s = ISN_C + 1, ISN_S + 1
    if third_ack_key is not None:
        p.append(_seg(C1, S, 40000, 80, "A", [MPCapable(version=version, flags=0x01, sender_key=KEY_C,
                                                        receiver_key=third_ack_key)], c, s))
    if first_mapping == "none":
        first = [DSS(flags="Aa", data_ack=IDSN_S + 1)]
    else:
        first = [MPCapable(version=version, flags=0x01, sender_key=KEY_C, receiver_key=first_data_key,
                           data_level_length=100)]
    p += [_seg(C1, S, 40000, 80, "PA", first, c, s, bytes(100)),
          _seg(S, C1, 80, 40000, "A", [DSS(flags="Aa", data_ack=IDSN_C + 101)], s, c + 100)]
    ssn, dsn, length = 101, IDSN_C + 101, 100
    if second == "off":
        ssn += 1000
    elif second == "dsn+7":
        dsn += 7
    elif second == "conflict":
        length = 200
    mapping = DSS(flags="AaMm", data_ack=IDSN_S + 1, dsn=dsn, ssn=ssn, data_level_length=length)
    if second == "infinite":
        mapping = DSS(flags="AaMm", data_ack=IDSN_S + 1, dsn=dsn, ssn=ssn, data_level_length=0)
    p += [_seg(C1, S, 40000, 80, "PA", [mapping], c + 100, s, bytes(100)),
          _seg(S, C1, 80, 40000, "A", [DSS(flags="Aa", data_ack=IDSN_C + 201)], s, c + 200)]
    if second == "conflict":  # SSN 151..250 re-mapped 1000 bytes further (SSN 201..250 overlap)
        p += [_seg(C1, S, 40000, 80, "PA", [DSS(flags="AaMm", data_ack=IDSN_S + 1, dsn=IDSN_C + 1151, ssn=151,
                                                data_level_length=100)], c + 200, s, bytes(100))]
    if second == "infinite":  # after an infinite mapping, data needs no mapping
        p += [_seg(C1, S, 40000, 80, "PA", [DSS(flags="Aa", data_ack=IDSN_S + 1)], c + 200, s, bytes(100))]
    token = crypto.token(KEY_S) if join_token is None else join_token
    synack_mac = crypto.join_synack_hmac(KEY_S, KEY_C, R_S, R_C)
    ack_mac = crypto.join_hmac(KEY_C, KEY_S, R_C, R_S)[:20]
    jc, js = ISN_JC + 1, ISN_JS + 1
    p += [_seg(C2, S, 40001, 80, "S", [MPJoinSyn(address_id=1, receiver_token=token, sender_random=R_C)],
               ISN_JC, 0),
          _seg(S, C2, 80, 40001, "SA", [MPJoinSynAck(address_id=0, sender_truncated_hmac=synack_mac,
                                                     sender_random=R_S)], ISN_JS, jc),
          _seg(C2, S, 40001, 80, "A", [MPJoinAck(sender_hmac=ack_mac)], jc, js),
          _seg(S, C2, 80, 40001, "A", [DSS(flags="Aa", data_ack=IDSN_C + 201)], js, jc),
          _seg(C2, S, 40001, 80, "PA", [DSS(flags="AaMm", data_ack=IDSN_S + 1, dsn=IDSN_C + 301, ssn=1,
                                            data_level_length=50)], jc, js, bytes(50)),
          _seg(S, C2, 80, 40001, "A", [DSS(flags="Aa", data_ack=IDSN_C + 351)], js, jc + 50)]
    return p


def _write(tmp_path: Path, pkts: list, name: str = "c.pcap") -> list[Path]:
    path = tmp_path / name
    wrpcap(str(path), pkts)
    return [path]


def _judged(tmp_path: Path, pkts: list) -> tuple[list[Path], list[Judgment]]:
    pcaps = _write(tmp_path, pkts)
    return pcaps, check(pcaps)[1]


def _of(judgments: list[Judgment], rid: str) -> list[Judgment]:
    return [j for j in judgments if j.rid == rid and j.connection == 0]


def _set(judgments: list[Judgment], rid: str, outcome: str | None, where: list[Where] | None = None
         ) -> list[Judgment]:
    """The judgments with every judgment of `rid` on connection 0 replaced by one with `outcome`
    (pointing at `where`, default at what the replaced ones pointed at); None removes them."""
    mine = _of(judgments, rid)
    rest = [j for j in judgments if j not in mine]
    if outcome is None:
        return rest
    frames = where if where is not None else [w for j in mine for w in j.where]
    return [*rest, Judgment(rid, outcome, f"made {outcome} by the test", frames, 0)]


# -- the defects: for each TABLE entry, a capture tshark flags, and the rule that must FAIL -------
@dataclasses.dataclass(frozen=True)
class Defect:
    tshark: str  # the TABLE entry (Correspondence.tshark) it exercises
    rid: str
    capture: Callable[[], list]


DEFECTS = {
    "echoed key in the third ACK": Defect(ta.ECHOED_KEY, "R3.1-11", lambda: flow(third_ack_key=KEY_S + 1)),
    "echoed key in MP_CAPABLE with data": Defect(ta.ECHOED_KEY, "R3.1-L01",
                                                 lambda: flow(first_data_key=KEY_S + 1)),
    "no crypto flag": Defect(ta.MISSING_ALGORITHM, "R3.1-19", lambda: flow(syn_flags=0x80)),
    "crypto flag G": Defect(ta.UNSUPPORTED_ALGORITHM, "R3.1-18", lambda: flow(syn_flags=0x03)),
    "mapping misses its segment": Defect(ta.MISSING_MAPPING, "R3.3.1-16", lambda: flow(second="off")),
    "first data without a mapping": Defect(ta.MISSING_MAPPING, "R3.7-02", lambda: flow(first_mapping="none")),
    "mapping altered": Defect(f"{ta.RELATED}, with our decode of the related DSS mappings", "R3.3.1-01",
                              lambda: flow(second="conflict")),
    "data not at IDSN + 1": Defect(f"{ta.DSS_DSN} from {ta.EXPECTED_IDSN}", "R3.1-34",
                                   lambda: flow(second="dsn+7")),
}


# -- where tshark's analysis shows a rule holds: a FAIL of ours at that frame is a disagreement ----
@dataclasses.dataclass(frozen=True)
class Holds:
    tshark: str  # the TABLE entry whose positive side it exercises
    rid: str
    capture: Callable[[], list]


HOLDS = {
    "crypto flag H alone (R3.1-19)": Holds(ta.MISSING_ALGORITHM, "R3.1-19", flow),
    "crypto flag H alone (R3.1-18)": Holds(ta.UNSUPPORTED_ALGORITHM, "R3.1-18", flow),
    "mapping covers its segment": Holds(ta.RELATED, "R3.3.1-16", flow),
    "infinite mapping": Holds(ta.INFINITE_MAPPING, "R3.3.1-16", lambda: flow(second="infinite")),
    "data at IDSN + 1": Holds(f"{ta.DSS_DSN} from {ta.EXPECTED_IDSN}", "R3.1-34", flow),
}
JOINS_ENTRY = next(e.tshark for e in ta.TABLE if e.analyzer.__name__ == "_Joins")


@pytest.mark.parametrize("name", sorted(HOLDS))
def test_a_failure_where_tshark_shows_the_rule_holds_is_a_disagreement(tmp_path, name):
    """tshark looks for positive evidence only where a rule of ours FAILs: flip our verdict to FAIL
    at the frame it cites (for the infinite mapping: that segment) and tshark must contradict it."""
    case = HOLDS[name]
    pcaps = _write(tmp_path, case.capture())
    conns, judgments = check(pcaps)
    assert [d for d in ta.compare_judgments(pcaps, judgments) if d.rid == case.rid] == []
    at = conns[0].infinite_mapping[:1] if case.tshark == ta.INFINITE_MAPPING else None
    result = ta.analyse(pcaps, _set(judgments, case.rid, FAIL, at))
    assert any(f.rid == case.rid and f.kind == ta.HOLDS for f in result.findings), result.findings
    found = [d for d in result.disagreements if d.rid == case.rid]
    assert len(found) == 1 and found[0].outcome == FAIL and found[0].ours == "made fail by the test"


def test_a_join_tshark_matches_must_be_judged_by_us(tmp_path):
    pcaps, judgments = _judged(tmp_path, flow())
    assert [d for d in ta.compare_judgments(pcaps, judgments) if d.rid == "R3.2-03"] == []
    found = [d for d in ta.compare_judgments(pcaps, _set(judgments, "R3.2-03", None)) if d.rid == "R3.2-03"]
    assert len(found) == 1 and found[0].outcome is None and found[0].frames


def test_tshark_false_positives_are_not_taken_for_evidence(tmp_path):
    """Flag C alone raises tshark's "Unsupported algorithm" (its mask is RFC 6824's C..H); a pure
    ACK after data raises "No mapping available". Neither may turn into a disagreement."""
    pcaps, judgments = _judged(tmp_path, flow(syn_flags=0x21))  # C and H
    assert ta.compare_judgments(pcaps, judgments) == []
    pcaps, judgments = _judged(tmp_path, flow(second="infinite"))
    assert ta.compare_judgments(pcaps, judgments) == []


def test_every_expert_and_field_is_one_this_tshark_has():
    rows = [cols for line in run(["tshark", "-G", "fields"], timeout=60).stdout.splitlines()
            if len(cols := line.split("\t")) > 4 and cols[0] == "F"]
    used = {*ta.EXPERTS, ta.KEEP_ALIVE, ta.STREAM, ta.RELATED, ta.DSS_DSN, ta.EXPECTED_IDSN, ta.DATA_ACK}
    assert used <= {cols[2] for cols in rows}, used - {cols[2] for cols in rows}
    # tshark 4.0 has no -G expert: its MPTCP expert infos are the FT_NONE fields mptcp.* of protocol
    # tcp. Every one of them is in the table.
    experts = {cols[2] for cols in rows if cols[2].startswith("mptcp.") and cols[3:5] == ["FT_NONE", "tcp"]}
    assert experts == set(ta.EXPERTS)
    assert experts <= {e.tshark for e in ta.TABLE}


def test_every_table_entry_has_a_test():
    tested = ({d.tshark for d in DEFECTS.values()} | {h.tshark for h in HOLDS.values()}
              | {JOINS_ENTRY})
    assert {e.tshark for e in ta.TABLE} == tested
    catalogue = load_catalogue()
    assert all(rid in catalogue for rid in ta.table_rids()), ta.table_rids()
    assert len(ta.table_lines()) == len(ta.TABLE)


def test_a_correct_capture_gives_no_disagreement(tmp_path):
    pcaps, judgments = _judged(tmp_path, flow())
    result = ta.analyse(pcaps, judgments)
    assert result.disagreements == [], [str(d) for d in result.disagreements]
    assert [f for f in result.findings if f.kind == ta.VIOLATED] == []
    for rid in ("R3.1-11", "R3.1-18", "R3.1-19", "R3.1-34", "R3.2-03", "R3.3.1-16"):
        assert {j.outcome for j in _of(judgments, rid)} == {PASS}, (rid, [str(j) for j in judgments])
    # Every kind of evidence was looked at: nothing passes for want of evidence.
    assert set(result.examined) == {"MP_CAPABLE echoing the listener's key", "MP_CAPABLE crypto flags",
                                    "data segments in tshark's mapping analysis", "joins matched to a connection",
                                    "64-bit mappings placed by tshark's IDSN"}, result.examined


@pytest.mark.parametrize("name", sorted(DEFECTS))
def test_tshark_and_our_rule_both_flag_the_defect(tmp_path, name):
    defect = DEFECTS[name]
    pcaps, judgments = _judged(tmp_path, defect.capture())
    result = ta.analyse(pcaps, judgments)
    assert any(f.rid == defect.rid and f.kind == ta.VIOLATED for f in result.findings), result.findings
    assert [d for d in result.disagreements if d.rid == defect.rid] == []
    assert {j.outcome for j in _of(judgments, defect.rid)} == {FAIL}, [str(j) for j in judgments]


@pytest.mark.parametrize("name", sorted(DEFECTS))
def test_a_judgment_made_wrong_on_purpose_is_a_disagreement(tmp_path, name):
    defect = DEFECTS[name]
    pcaps, judgments = _judged(tmp_path, defect.capture())
    # Agreement once our rule fails (whatever the rules say today).
    assert [d for d in ta.compare_judgments(pcaps, _set(judgments, defect.rid, FAIL)) if d.rid == defect.rid] == []
    passed = [d for d in ta.compare_judgments(pcaps, _set(judgments, defect.rid, PASS)) if d.rid == defect.rid]
    assert len(passed) == 1 and passed[0].outcome == PASS and passed[0].ours == "made pass by the test"
    (d,) = passed
    assert d.frames and all(Path(w.pcap) == pcaps[0] for w in d.frames)
    assert d.tshark and d.rid in str(d)
    unjudged = [d for d in ta.compare_judgments(pcaps, _set(judgments, defect.rid, None)) if d.rid == defect.rid]
    assert len(unjudged) == 1 and unjudged[0].outcome is None
    # A rule the rules do not judge is compared only where a judgment exists.
    rest = _set(judgments, defect.rid, None)
    assert [d for d in ta.compare_judgments(pcaps, rest, judged=set()) if d.rid == defect.rid] == []


def _sha1_token(key: int) -> int:
    return int.from_bytes(hashlib.sha1(key.to_bytes(8, "big")).digest()[:4], "big")


def test_v0_tokens_are_sha1_for_tshark_and_for_our_model(tmp_path):
    """RFC 6824 connections hash keys with SHA-1 (this oracle found the model using SHA-256 for
    them): a v0 join whose token is SHA-1's is matched by both, with no disagreement; one with a
    SHA-256 token by neither."""
    pcaps, judgments = _judged(tmp_path, flow(version=0, join_token=_sha1_token(KEY_S)))
    assert ta.compare_judgments(pcaps, judgments) == []
    assert any(j.rid == "R3.2-03" for j in judgments)
    pcaps, judgments = _judged(tmp_path, flow(version=0))
    assert not any(j.rid == "R3.2-03" for j in judgments)
    assert ta.compare_judgments(pcaps, judgments) == []


def test_a_missing_capture_is_bad_input(tmp_path):
    with pytest.raises(InputError, match="no such capture"):
        ta.analyse([tmp_path / "nope.pcap"], [])


# -- live kernel captures ---------------------------------------------------------------------------
@pytest.mark.skipif(os.geteuid() != 0, reason="builds network namespaces and captures: needs root")
def test_live_kernel_captures_show_no_disagreement(tmp_path):
    """Kernel to kernel (tests/wire_corpus.py, the IPv6 scenario with checksums: MP_CAPABLE with
    data, joins, ADD_ADDR, MP_PRIO, REMOVE_ADDR, MP_FASTCLOSE): every transfer's captures, in the
    order the lab gives them to the rules, show no disagreement, and every kind of evidence was
    looked at. Judgments made to fail where tshark shows the rule holds must disagree."""
    from wire_corpus import SCENARIOS, build_corpus

    from conformance import doctor
    from conformance.errors import CapabilityMissing
    from conformance.net.names import our_netns, run_prefix

    try:
        doctor.require("root", "socket:mptcp", "ip-mptcp", "tcpdump", "tshark", "mnexec", "ethtool", "qdisc:htb")
    except CapabilityMissing as exc:
        pytest.skip(f"this machine cannot build the corpus: {exc}")
    corpus = build_corpus(tmp_path / "corpus", scenarios=tuple(s for s in SCENARIOS if s.family == "ipv6"))
    left = [n for n in our_netns() if n.startswith(f"{run_prefix()}-")]
    assert not left, f"the corpus lab left namespaces behind: {left}"
    transfers: dict[str, list] = {}
    for p in corpus.pcaps:
        transfers.setdefault(p.transfer, []).append(p)
    examined: dict[str, int] = {}
    for transfer, pcaps in sorted(transfers.items()):
        ordered = [p.path for p in sorted(pcaps, key=lambda p: (p.node not in ("c1", "s1"), p.intf))]
        _, judgments = check(ordered)
        result = ta.analyse(ordered, judgments)
        assert result.disagreements == [], (transfer, [str(d) for d in result.disagreements])
        for kind, n in result.examined.items():
            examined[kind] = examined.get(kind, 0) + n
        holding = [j for j in judgments if j.outcome == PASS and j.rid in ("R3.1-18", "R3.1-19", "R3.1-34",
                                                                           "R3.3.1-16")]
        failed = [dataclasses.replace(j, outcome=FAIL) if j in holding else j for j in judgments]
        found = {d.rid for d in ta.compare_judgments(ordered, failed) if d.outcome == FAIL}
        assert found == {j.rid for j in holding}, (transfer, found)
    # Every kind of evidence was looked at (and, when retransmissions relate a segment to several
    # mappings, the conflict check too: that depends on the run).
    assert set(examined) >= {"MP_CAPABLE echoing the listener's key", "MP_CAPABLE crypto flags",
                             "data segments in tshark's mapping analysis", "joins matched to a connection",
                             "64-bit mappings placed by tshark's IDSN"}, examined
    assert examined["joins matched to a connection"] >= 2
    assert examined["data segments in tshark's mapping analysis"] > 100


def test_a_data_fin_takes_no_subflow_space_in_the_conflict_check():
    """§3.3.3: DSN 80 length 11 with DATA_FIN maps 10 subflow octets; data re-sent right after
    them (another DSN) does not intersect it."""
    fin = (1, 0, 100, 10, 80, True)  # SSN 100, 10 subflow octets (length 11 with the DATA_FIN)
    after = (1, 0, 110, 5, 20, True)
    assert not ta._conflict(fin, after)
    assert ta._conflict(fin, (1, 0, 109, 5, 20, True))
