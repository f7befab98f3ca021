"""tshark's MPTCP *analysis* as a second oracle for the passive rules (conformance.observe.rules).

conformance.observe.oracles checks that tshark and our codec decode every option alike. This
module goes one level up: where tshark's own MPTCP analysis (its expert infos and generated
analysis fields, with `mptcp.analyze_mptcp` and `mptcp.analyze_mappings` on) judges the same thing
as one of our rules, the two verdicts are compared per connection. A disagreement is reported,
never resolved: either tshark or our rule is wrong, and a human has to look.

How. Our model (conformance.observe.model) is rebuilt from the captures exactly as rules.check
builds it, so its connection indexes are those of the judgments and each direction of each
subflow has the same vantage (the capture the model reads it from). tshark reads each vantage
capture once, in fields mode. Evidence comes only from the frames the model reads, so tshark and
our rules look at the same frames; what tshark learnt from the other frames of a capture (keys,
mappings, Data ACKs) still counts. Each entry of TABLE turns what tshark shows into findings about
one rule and one connection:

- violated: tshark shows the requirement broken. Our rule must FAIL on that connection: a PASS is
  a disagreement, and so is no judgment at all if the rule is one the rules judge (`judged`).
- holds: tshark positively shows the requirement met at a frame. A FAIL of our rule pointing at
  that frame is a disagreement. (Computed only for frames some FAIL points at.)
- judge: tshark shows something our rule must judge (a join it attaches to a connection); no
  judgment of that rule on that connection pointing at the frame is a disagreement.

A finding may be scoped to frames (`at`): then only judgments whose evidence includes one of
those frames are compared with it. Rules not in `judged` (e.g. IDs another rule set has not
implemented yet) are compared only where a judgment exists.

tshark 4.0 (4.0.17, Debian 12): what it has and what we found by running it.
- Expert infos. 4.0 has no `tshark -G expert`; its MPTCP expert infos are listed by
  `tshark -G fields` as FT_NONE fields of protocol tcp. All five are in TABLE:
  mptcp.connection.echoed_key_mismatch, .missing_algorithm, .unsupported_algorithm,
  mptcp.dss.infinite_mapping, mptcp.dss.missing_mapping (the last needs analyze_mappings).
  `-T fields -e <expert>` prints 1 on a frame that raised it.
- The crypto-flag experts use the RFC 6824 mask 0x3F (flags C..H), not RFC 8684's D..H (0x1F):
  an MP_CAPABLE with C ("no more subflows") set raises "Unsupported algorithm" although H alone
  selects HMAC-SHA256, and C alone hides "No crypto algorithm specified". So an "Unsupported
  algorithm" on a v1 option whose D..H are exactly H is not taken as evidence, and silence is
  taken as evidence only when neither crypto expert fired.
- "No mapping available" is also raised on segments without payload (tshark looks up the one
  sequence number such a segment carries: a pure ACK sent after data has none mapped) and after
  an infinite mapping, which tshark does not model (it files no mapping of length 0). Only
  segments with payload, not keep-alives, and not after the sender's infinite mapping on that
  subflow are used.
- tshark registers the implicit mapping of MP_CAPABLE with data at the carrying segment's own
  sequence number (every repeat of the option makes a new, shifted mapping), so MP_CAPABLE frames
  among mptcp.related_mapping are ignored when mappings are compared.
- Its mapping tree keeps one mapping per start SSN: a second mapping with the same start SSN
  (a same-range re-declaration with another DSN) is not listed in mptcp.related_mapping. So the
  mapping-conflict evidence for R3.3.1-01 can only be positive, never a proof of absence.
- A segment that begins before the mapping that overlaps it (legal: a mapping may cover part of a
  segment) makes tshark 4.0 fail a dissector assertion ("mptcp_map_relssn_to_rawdsn", shown as
  Malformed). Not used: with several overlapping mappings it fires on whichever one its interval
  search returns last.
- mptcp.dss.dsn (the DSN relative to tshark's IDSN of the key) picks the 32-to-64-bit conversion
  by the Data ACK width flag (a) instead of the DSN's (m): a 32-bit DSN next to a 64-bit Data ACK
  comes out wrong, and a 64-bit DSN next to a 32-bit Data ACK (Linux does this) is OR-ed with the
  IDSN's upper half, which is exact unless the DSN's upper half differs. Only 64-bit DSNs are
  used (like R3.1-34 itself), and only where tshark saw the sender's key in the same capture
  (without it, it counts from 0 or from the first DSN seen).
- Joins: tshark matches MP_JOIN tokens against the keys of the same capture file only; a join
  whose connection's handshake is in another capture is in a stream of its own. Evidence about a
  join is used only when both handshake keys of the candidate connection precede the join's SYN
  in the join's vantage capture.
- Left out: mptcp.reinjection_of / mptcp.reinjected_in (needs mptcp.intersubflows_retransmission;
  re-sending data on another subflow is allowed, so it shows no defect), tshark's DSS checksum
  (4.0 neither shows nor verifies it, see oracles.TSHARK_BLIND), mptcp.master and
  mptcp.analysis.subflows (the same information as mptcp.stream)."""

from __future__ import annotations

import concurrent.futures
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from conformance.errors import InputError
from conformance.observe.model import Connection, ModelBuilder, Subflow, Where, merged_packets
from conformance.observe.oracles import AGGREGATOR, capture_key, tshark_rows
from conformance.observe.rules import FAIL, NOT_EXERCISED, PASS, Judgment, rule_ids
from conformance.wire.bulk import Packet, iter_pcap

# Set explicitly on every run: defaults differ between versions and user profiles.
PREFS = ("mptcp.analyze_mptcp:TRUE", "mptcp.analyze_mappings:TRUE", "mptcp.relative_sequence_numbers:TRUE",
         "tcp.analyze_sequence_numbers:TRUE", "tcp.relative_sequence_numbers:TRUE")

# tshark 4.0's MPTCP expert infos: field name -> the message tshark shows.
ECHOED_KEY = "mptcp.connection.echoed_key_mismatch"
MISSING_ALGORITHM = "mptcp.connection.missing_algorithm"
UNSUPPORTED_ALGORITHM = "mptcp.connection.unsupported_algorithm"
INFINITE_MAPPING = "mptcp.dss.infinite_mapping"
MISSING_MAPPING = "mptcp.dss.missing_mapping"
EXPERTS = {
    ECHOED_KEY: "The echoed key in the ACK of the MPTCP handshake does not match the key of the SYN/ACK",
    MISSING_ALGORITHM: "No crypto algorithm specified",
    UNSUPPORTED_ALGORITHM: "Unsupported algorithm",
    INFINITE_MAPPING: "Fallback to infinite mapping",
    MISSING_MAPPING: "No mapping available",
}
KEEP_ALIVE = "tcp.analysis.keep_alive"
# tshark's generated MPTCP analysis fields read here.
STREAM = "mptcp.stream"  # tshark's MPTCP connection of a subflow
RELATED = "mptcp.related_mapping"  # frames whose mapping overlaps a segment's payload
DSS_DSN = "mptcp.dss.dsn"  # a DSS mapping's DSN relative to tshark's IDSN of the sender's key
EXPECTED_IDSN = "mptcp.expected_idsn"  # tshark's IDSN of an MP_CAPABLE key
DATA_ACK = "mptcp.ack"  # a Data ACK relative to the acknowledged side's IDSN
_FIELDS = ("frame.number", "tcp.len", STREAM, RELATED, DSS_DSN, EXPECTED_IDSN, DATA_ACK, KEEP_ALIVE, *EXPERTS)
_FLAGS = _FIELDS[7:]  # FT_NONE fields: "1" on a frame that raised them

VIOLATED, HOLDS, JUDGE = "violated", "holds", "judge"


# -- tshark ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TsharkFrame:
    """What tshark's MPTCP analysis shows for one TCP segment."""

    frame: int
    tcp_len: int
    stream: int | None  # mptcp.stream (None: no MPTCP state yet, e.g. a v1 SYN)
    experts: frozenset[str]  # the EXPERTS (and KEEP_ALIVE) raised on this frame
    related: tuple[int, ...]  # mptcp.related_mapping
    dss_dsn: tuple[int, ...]  # mptcp.dss.dsn, one per DSS mapping tshark could place
    has_idsn: bool  # tshark computed an IDSN here (an MP_CAPABLE carrying the sender's key)
    data_ack: tuple[int, ...]  # mptcp.ack


def tshark_analysis(pcap: Path | str) -> dict[int, TsharkFrame]:
    """frame number -> TsharkFrame for every TCP segment of `pcap`, analysed with PREFS. Cached per
    file and modification time: treat the result as read-only."""
    return _tshark_analysis(*capture_key(pcap))


def _ints(value: str) -> tuple[int, ...]:
    return tuple(int(v) for v in value.split(AGGREGATOR)) if value else ()


@lru_cache(maxsize=32)
def _tshark_analysis(pcap: str, mtime: float) -> dict[int, TsharkFrame]:
    frames: dict[int, TsharkFrame] = {}
    for cols in tshark_rows(pcap, _FIELDS, PREFS, timeout=600, doing="analyse"):
        if len(cols) < len(_FIELDS):
            continue
        number, tcp_len, stream, related, dss_dsn, idsn, ack = cols[:7]
        frames[int(number)] = TsharkFrame(
            int(number), _ints(tcp_len)[0] if tcp_len else 0, _ints(stream)[0] if stream else None,
            frozenset(name for name, value in zip(_FLAGS, cols[7:], strict=False) if value),
            _ints(related), _ints(dss_dsn), bool(idsn), _ints(ack))
    return frames


# -- findings and disagreements -------------------------------------------------------------------
@dataclass(frozen=True)
class Finding:
    """What tshark's analysis shows about one rule on one connection."""

    rid: str
    connection: int
    kind: str  # VIOLATED, HOLDS or JUDGE
    frames: tuple[Where, ...]  # where tshark shows it
    message: str  # tshark's expert message or analysis, in words
    at: frozenset[Where] | None = None  # compare only with judgments whose evidence includes one of these


@dataclass(frozen=True)
class RuleDisagreement:
    rid: str
    connection: int
    frames: tuple[Where, ...]  # tshark's evidence
    tshark: str  # what tshark's analysis shows (its expert message, or the analysis in words)
    ours: str  # our judgment's sentence, or why there is none
    outcome: str | None  # our judgment's outcome (None: not judged)

    def __str__(self) -> str:
        where = ", ".join(str(w) for w in self.frames[:3]) or "-"
        return (f"[{self.rid}] connection {self.connection}: tshark: {self.tshark} ({where}); "
                f"our rule: {self.outcome or 'not judged'}: {self.ours}")


@dataclass
class Comparison:
    """Everything one comparison found; compare_judgments returns its `disagreements`."""

    findings: list[Finding] = field(default_factory=list)
    disagreements: list[RuleDisagreement] = field(default_factory=list)
    pcaps: list[str] = field(default_factory=list)  # the captures tshark analysed (the vantages)
    examined: Counter = field(default_factory=Counter)  # evidence looked at, per kind: nothing passes vacuously


# -- segments, attributed to our connections ------------------------------------------------------
@dataclass(slots=True)
class Seen:
    """One segment of a capture that shows one of our subflows: our decode and tshark's analysis.
    `read`: the model reads this direction of the subflow from this capture (its vantage), so this
    is the frame our judgments point at. tshark analyses every frame of a capture, so the others
    still tell what it knew (keys, mappings, Data ACKs) but are no evidence themselves."""

    where: Where
    read: bool
    conn: int | None  # our connection index (None: a join our model matched to no connection)
    sub: Subflow
    side: int  # the sender's side of the connection (0: initiator)
    packet: Packet
    tshark: TsharkFrame | None


def _sender_side(sub: Subflow, p: Packet) -> int:
    sub_side = 0 if (p.src, p.sport) == sub.tuple4[:2] else 1
    if sub.initial:
        return sub_side
    return 1 - sub.responder_side if sub_side == 0 else sub.responder_side


def _ends(t: tuple) -> frozenset:
    return frozenset(((t[0], t[1]), (t[2], t[3])))


def _dss_maps(p: Packet) -> list[dict]:
    """The DSS options of a segment that carry a mapping (flag M), in order."""
    return [f for name, f in p.options if name == "DSS" and f["flags"] & 0x04]


def _mpc(p: Packet) -> dict | None:
    return next((f for name, f in p.options if name == "MPCapable"), None)


class _Analyzer:
    """Sees every segment of our subflows in every vantage capture, capture by capture, each in
    frame order; emits findings from the segments it `read`s."""

    def __init__(self, wanted: set[tuple[str, Where]], conns: list[Connection]):
        self.wanted, self.conns = wanted, conns
        self.out: list[Finding] = []
        self.examined: Counter = Counter()

    def want(self, rid: str, where: Where) -> bool:
        """A FAIL of `rid` points at `where`: worth looking for tshark's evidence that it holds."""
        return (rid, where) in self.wanted

    def emit(self, rid: str, conn: int, kind: str, frames: Iterable[Where], message: str,
             at: Iterable[Where] | None = None) -> None:
        self.out.append(Finding(rid, conn, kind, tuple(frames), message, None if at is None else frozenset(at)))

    def see(self, s: Seen) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """Called once after the last capture."""


# -- the analyzers behind TABLE --------------------------------------------------------------------
class _EchoedKey(_Analyzer):
    def see(self, s: Seen) -> None:
        t, mpc = s.tshark, _mpc(s.packet)
        if not s.read or t is None or s.conn is None or mpc is None or mpc.get("receiver_key") is None:
            return
        self.examined["MP_CAPABLE echoing the listener's key"] += 1
        if ECHOED_KEY in t.experts:
            # The option's form says which requirement it serves; a judgment of the other one that
            # cites this frame as the echo must not PASS either.
            with_data = mpc.get("data_level_length") is not None
            rid, other = ("R3.1-L01", "R3.1-11") if with_data else ("R3.1-11", "R3.1-L01")
            self.emit(rid, s.conn, VIOLATED, [s.where], EXPERTS[ECHOED_KEY])
            self.emit(other, s.conn, VIOLATED, [s.where], EXPERTS[ECHOED_KEY], at=[s.where])


class _CryptoFlags(_Analyzer):
    """R3.1-19 from "No crypto algorithm specified", R3.1-18 from "Unsupported algorithm" (v1)."""

    def see(self, s: Seen) -> None:
        t, mpc = s.tshark, _mpc(s.packet)
        if not s.read or t is None or s.conn is None or mpc is None:
            return
        self.examined["MP_CAPABLE crypto flags"] += 1
        missing, unsupported = MISSING_ALGORITHM in t.experts, UNSUPPORTED_ALGORITHM in t.experts
        if missing:  # tshark's mask (C..H) is wider than D..H: none there means none in D..H either
            self.emit("R3.1-19", s.conn, VIOLATED, [s.where], EXPERTS[MISSING_ALGORITHM])
        elif not unsupported and self.want("R3.1-19", s.where):  # C..H is H alone: one is selected
            self.emit("R3.1-19", s.conn, HOLDS, [s.where], "no crypto expert: tshark sees flag H alone among C..H",
                      at=[s.where])
        if mpc["version"] != 1:
            return  # R3.1-18 is about v1's D..H; tshark checks v0 with the same mask
        if unsupported and mpc["flags"] & 0x1F != 0x01:  # not merely tshark counting flag C as crypto
            self.emit("R3.1-18", s.conn, VIOLATED, [s.where],
                      f"{EXPERTS[UNSUPPORTED_ALGORITHM]} (flags {mpc['flags']:#04x})")
        elif not unsupported and not missing and self.want("R3.1-18", s.where):
            self.emit("R3.1-18", s.conn, HOLDS, [s.where], "no crypto expert: tshark sees flag H alone among C..H",
                      at=[s.where])


class _Mappings(_Analyzer):
    """"No mapping available" on a segment with payload: the mapping the segment carries misses it
    (R3.3.1-16), or a segment of the first subflow carries none before any Data ACK of its sender's
    data (R3.7-02). A frame whose mptcp.related_mapping names itself carries a mapping that overlaps
    its payload, and an infinite mapping covers the segment: R3.3.1-16 holds there."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.infinite: set[tuple[str, int, int]] = set()  # (pcap, id(subflow), side) past an infinite mapping
        self.acked: dict[tuple[str, int, int], int] = {}  # (pcap, connection, side) -> first frame acking its data
        self.shown: dict[tuple[str, int], set[int]] = {}  # (pcap, connection) -> id() of its subflows shown there
        self.unmapped: list[tuple[Seen, TsharkFrame]] = []  # R3.7-02 candidates, decided at the end

    def see(self, s: Seen) -> None:
        t, p, pcap = s.tshark, s.packet, s.where.pcap
        if t is None or s.conn is None:
            return
        self.shown.setdefault((pcap, s.conn), set()).add(id(s.sub))
        sender = (pcap, id(s.sub), s.side)
        if INFINITE_MAPPING in t.experts:
            self.infinite.add(sender)
            if s.read and self.want("R3.3.1-16", s.where):
                self.emit("R3.3.1-16", s.conn, HOLDS, [s.where],
                          f"{EXPERTS[INFINITE_MAPPING]}: an infinite mapping covers the segment", at=[s.where])
        # mptcp.ack counts from the acknowledged side's IDSN: above 1, some of its data is acked.
        if any(a > 1 for a in t.data_ack):
            self.acked.setdefault((pcap, s.conn, 1 - s.side), s.where.frame)
        if not s.read:
            return
        maps = [f for f in _dss_maps(p) if f.get("data_level_length")]
        if t.tcp_len > 0 and (t.related or MISSING_MAPPING in t.experts):
            self.examined["data segments in tshark's mapping analysis"] += 1
        if maps and s.where.frame in t.related and self.want("R3.3.1-16", s.where):
            self.emit("R3.3.1-16", s.conn, HOLDS, [s.where], f"{RELATED} names this frame: the mapping it "
                      "carries overlaps its payload", at=[s.where])
        if (MISSING_MAPPING not in t.experts or t.tcp_len <= 0 or KEEP_ALIVE in t.experts
                or sender in self.infinite):
            return
        if maps:
            m = maps[0]
            self.emit("R3.3.1-16", s.conn, VIOLATED, [s.where], f"{EXPERTS[MISSING_MAPPING]} for the "
                      f"{t.tcp_len}-byte payload, although the segment carries a mapping (SSN {m['ssn']}, "
                      f"length {m['data_level_length']})")
            return
        mpc = _mpc(p)
        if s.sub.initial and (mpc is None or mpc.get("data_level_length") is None):
            self.unmapped.append((s, t))  # (an MP_CAPABLE with data maps its segment implicitly)

    def finish(self) -> None:
        for s, t in self.unmapped:
            pcap, conn = s.where.pcap, s.conn
            assert conn is not None
            # Only where the capture shows every subflow of the connection: a Data ACK may come on
            # any of them, and tshark saw none of those that are not in this capture.
            if self.shown.get((pcap, conn), set()) != {id(sub) for sub in self.conns[conn].subflows}:
                continue
            acked = self.acked.get((pcap, conn, s.side))
            if acked is None or acked > s.where.frame:
                self.emit("R3.7-02", conn, VIOLATED, [s.where], f"{EXPERTS[MISSING_MAPPING]}: a {t.tcp_len}-byte "
                          "segment of the first subflow carries no DSS mapping, before any Data ACK of its "
                          "sender's data")


class _MappingConflict(_Analyzer):
    """Two DSS mappings tshark relates to one segment map intersecting subflow ranges to different
    DSNs: a declared mapping was altered (R3.3.1-01)."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        # (pcap, frame) -> (id(subflow), side, SSN, length, DSN, 64-bit DSN) of each DSS mapping seen
        self.maps: dict[tuple[str, int], tuple[int, int, int, int, int, bool]] = {}
        self.reported: set[tuple[str, int, int]] = set()

    def see(self, s: Seen) -> None:
        t, pcap = s.tshark, s.where.pcap
        for f in _dss_maps(s.packet):
            if f.get("data_level_length"):
                # A DATA_FIN counts in the data-level length but takes no subflow space (§3.3.3).
                length = f["data_level_length"] - (1 if f["flags"] & 0x10 else 0)
                self.maps[(pcap, s.where.frame)] = (id(s.sub), s.side, f["ssn"], length, f["dsn"],
                                                    bool(f["flags"] & 0x08))
                break
        if not s.read or t is None or s.conn is None or len(t.related) < 2:
            return
        # MP_CAPABLE frames are left out: tshark files their implicit mapping at the wrong SSN.
        mine = [(n, m) for n in t.related if (m := self.maps.get((pcap, n))) and m[:2] == (id(s.sub), s.side)]
        if len(mine) > 1:
            self.examined["segments related to several DSS mappings"] += 1
        for i, (a, ma) in enumerate(mine):
            for b, mb in mine[i + 1:]:
                pair = (pcap, min(a, b), max(a, b))
                if pair in self.reported or not _conflict(ma, mb):
                    continue
                self.reported.add(pair)
                self.emit("R3.3.1-01", s.conn, VIOLATED, [Where(pcap, pair[1]), Where(pcap, pair[2]), s.where],
                          f"{RELATED} relates frame {s.where.frame} to the mappings of frames {pair[1]} and "
                          f"{pair[2]}, which map intersecting subflow ranges to different DSNs")


def _conflict(a: tuple, b: tuple) -> bool:
    _, _, ssn_a, len_a, dsn_a, wide_a = a
    _, _, ssn_b, len_b, dsn_b, wide_b = b
    if ssn_a + len_a <= ssn_b or ssn_b + len_b <= ssn_a:
        return False  # adjacent or apart: different DSN offsets are legal there
    modulus = 2**64 if wide_a and wide_b else 2**32  # a 32-bit DSN gives only the low half
    return (dsn_a - ssn_a) % modulus != (dsn_b - ssn_b) % modulus


class _Streams(_Analyzer):
    """Per capture: tshark's mptcp.stream of each connection's first subflow, and the first frame
    of each side carrying its key there (tshark matches tokens and counts DSNs from then on)."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.first: dict[tuple[str, int], int] = {}  # (pcap, connection) -> tshark stream of the first subflow
        self.keys: dict[tuple[str, int], dict[int, int]] = {}  # (pcap, connection) -> side -> frame

    def track(self, s: Seen) -> None:
        t = s.tshark
        if t is None or s.conn is None or not s.sub.initial:
            return
        key = (s.where.pcap, s.conn)
        if t.stream is not None:
            self.first.setdefault(key, t.stream)
        if t.has_idsn:
            self.keys.setdefault(key, {}).setdefault(s.side, s.where.frame)

    def ready(self, pcap: str, conn: int, before: int) -> bool:
        """tshark had both keys of `conn` in `pcap` before frame `before`."""
        sides = self.keys.get((pcap, conn), {})
        return len(sides) == 2 and max(sides.values()) < before


class _Joins(_Streams):
    """tshark attaches a join to the connection whose key gives its token (the mptcp.stream of that
    connection's first subflow); our model must attach it to the same one."""

    RIDS = ("R3.2-03", "R3.9.1-02", "R3.2-L01")  # the rules judging a join on its connection

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.syn: dict[int, Seen] = {}  # id(join subflow) -> its SYN, where the model reads it
        self.synack: dict[int, Where] = {}

    def see(self, s: Seen) -> None:
        self.track(s)
        if s.sub.initial or not s.read:
            return
        if s.where == s.sub.syn:
            self.syn[id(s.sub)] = s
        elif id(s.sub) not in self.synack and any(n == "MPJoinSynAck" for n, _ in s.packet.options):
            self.synack[id(s.sub)] = s.where

    def finish(self) -> None:
        for seen in self.syn.values():
            pcap, frame, sub, ours = seen.where.pcap, seen.where.frame, seen.sub, seen.conn
            stream = seen.tshark.stream if seen.tshark else None
            # Several connections share a stream when tshark merged them (one key used twice).
            theirs = sorted(c for (p, c), st in self.first.items()
                            if stream is not None and p == pcap and st == stream and self.ready(pcap, c, frame))
            if not theirs and (ours is None or not self.ready(pcap, ours, frame)):
                continue  # tshark knew the keys of no candidate when the join came
            self.examined["joins matched to a connection"] += 1
            a, a_port, b, b_port = sub.tuple4
            name = f"join {a}:{a_port} -> {b}:{b_port} (token {sub.token:#x})"
            synack = self.synack.get(id(sub))
            frames = [seen.where, *([synack] if synack else [])]
            for conn in theirs:  # its SYN/ACK's HMAC can be checked with that connection's keys
                if synack is not None and None not in self.conns[conn].keys:
                    self.emit("R3.2-03", conn, JUDGE, frames, f"{STREAM} {stream}: tshark matches the {name} "
                              "to this connection's key", at=[synack])
            if ours is not None and ours not in theirs:
                other = (f"connection {', '.join(map(str, theirs))}" if theirs
                         else "no connection whose keys it saw")
                for rid in self.RIDS:
                    self.emit(rid, ours, VIOLATED, frames, f"{STREAM} {stream}: tshark matches the {name} to "
                              f"{other}, not to this one", at=frames)


class _Idsn(_Streams):
    """tshark's mptcp.dss.dsn counts from its own IDSN of the sender's key: each side's lowest
    64-bit mapping must be at 1, or just past the data its MP_CAPABLE carried (R3.1-34)."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.lowest: dict[tuple[int, int], tuple[int, Where]] = {}  # (connection, side) -> (relative DSN, where)
        self.partial: set[tuple[int, int]] = set()  # sides with a 64-bit mapping tshark could not place

    def allowed(self, conn: int, side: int) -> set[int]:
        data = self.conns[conn].mpc_data[side]
        return {1, 1 + data} if data else {1}

    def see(self, s: Seen) -> None:
        self.track(s)
        t = s.tshark
        if not s.read or t is None or s.conn is None:
            return
        maps = _dss_maps(s.packet)
        wide = [i for i, f in enumerate(maps) if f["flags"] & 0x08 and f.get("data_level_length")]
        if not wide:
            return
        key, pcap = (s.conn, s.side), s.where.pcap
        sides = self.keys.get((pcap, s.conn), {})
        if (t.stream is None or t.stream != self.first.get((pcap, s.conn)) or sides.get(s.side, s.where.frame)
                >= s.where.frame or len(t.dss_dsn) != len(maps)):
            self.partial.add(key)  # not in tshark's stream of this connection, or before it had the key
            return
        rel = min(_signed(t.dss_dsn[i]) for i in wide)
        self.examined["64-bit mappings placed by tshark's IDSN"] += 1
        if key not in self.lowest or rel < self.lowest[key][0]:
            self.lowest[key] = (rel, s.where)
        if rel in self.allowed(*key) and self.want("R3.1-34", s.where):
            self.emit("R3.1-34", s.conn, HOLDS, [s.where],
                      f"{DSS_DSN} {rel}: this mapping is at tshark's own IDSN of the sender's key + {rel}",
                      at=[s.where])

    def finish(self) -> None:
        for (conn, side), (rel, where) in self.lowest.items():
            if (conn, side) in self.partial or rel in self.allowed(conn, side):
                continue
            who = "initiator" if side == 0 else "listener"
            self.emit("R3.1-34", conn, VIOLATED, [where], f"{DSS_DSN} {rel}: the {who}'s lowest 64-bit mapping is "
                      f"at tshark's IDSN of its key + {rel}, not + {min(self.allowed(conn, side))}")


def _signed(value: int) -> int:
    return value - 2**64 if value >= 2**63 else value


# -- the table ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Correspondence:
    """One thing tshark's analysis shows, the rule IDs it bears on, and what it implies for them."""

    tshark: str  # the expert info, or the analysis fields read
    rids: tuple[str, ...]
    flagged: str  # what tshark showing it implies (VIOLATED or JUDGE findings); "" if nothing
    positive: str  # what tshark's positive analysis implies (HOLDS findings); "" if nothing
    analyzer: type[_Analyzer]


TABLE: tuple[Correspondence, ...] = (
    Correspondence(ECHOED_KEY, ("R3.1-11", "R3.1-L01"),
                   "on the initiator's MP_CAPABLE ACK (R3.1-11) or MP_CAPABLE with data (R3.1-L01): the listener "
                   "key it echoes is not the SYN/ACK's, so it does not carry both keys; that rule must not PASS, "
                   "nor may the other one cite that frame in a PASS",
                   "", _EchoedKey),
    Correspondence(MISSING_ALGORITHM, ("R3.1-19",),
                   "on an MP_CAPABLE: no flag among C..H, so none among D..H; R3.1-19 must not PASS",
                   "no crypto expert on an MP_CAPABLE (C..H is H alone): R3.1-19 holds at that frame",
                   _CryptoFlags),
    Correspondence(UNSUPPORTED_ALGORITHM, ("R3.1-18",),
                   "on a v1 MP_CAPABLE whose D..H are not H alone (tshark's flag-C false positive set aside): "
                   "R3.1-18 must not PASS",
                   "no crypto expert on a v1 MP_CAPABLE (C..H is H alone): R3.1-18 holds at that frame",
                   _CryptoFlags),
    Correspondence(MISSING_MAPPING, ("R3.3.1-16", "R3.7-02"),
                   "on a segment with payload (not a keep-alive, not after its sender's infinite mapping on "
                   "that subflow): if it carries a mapping, that mapping misses its payload, R3.3.1-16 must not "
                   "PASS; if it carries none, is on the first subflow and precedes any Data ACK of its sender's "
                   "data (tshark's relative mptcp.ack > 1) in a capture showing every subflow of the "
                   "connection, R3.7-02 must not PASS",
                   "", _Mappings),
    Correspondence(RELATED, ("R3.3.1-16",), "",
                   "it names the frame itself: the mapping that frame carries overlaps its payload, R3.3.1-16 "
                   "holds at that frame", _Mappings),
    Correspondence(INFINITE_MAPPING, ("R3.3.1-16",), "",
                   "an infinite mapping covers the segment: R3.3.1-16 holds at that frame (and a later \"No "
                   "mapping available\" of that sender on that subflow is not evidence)", _Mappings),
    Correspondence(f"{RELATED}, with our decode of the related DSS mappings", ("R3.3.1-01",),
                   "two DSS mappings related to one segment map intersecting SSN ranges to different DSNs: "
                   "R3.3.1-01 must not PASS", "", _MappingConflict),
    Correspondence(f"{STREAM} of a join's SYN and of the first subflows", _Joins.RIDS,
                   "tshark matches the join's token to connection X's key: R3.2-03 must judge the join's SYN/ACK "
                   "on X; if our model put the join on another connection Y (or tshark matched it to none, "
                   "knowing Y's keys), no rule judging the join's frames on Y may PASS",
                   "", _Joins),
    Correspondence(f"{DSS_DSN} from {EXPECTED_IDSN}", ("R3.1-34",),
                   "a side's lowest 64-bit mapping is not at tshark's IDSN + 1 (or + 1 + the length of the data "
                   "its MP_CAPABLE carried): R3.1-34 must not PASS",
                   "a mapping at tshark's IDSN + 1 (or that +length): R3.1-34 holds at that frame", _Idsn),
)


def table_rids() -> set[str]:
    """Every rule ID some TABLE entry bears on."""
    return {rid for entry in TABLE for rid in entry.rids}


def table_lines(table: Iterable[Correspondence] = TABLE) -> list[str]:
    """The table in words, one line per entry."""
    return [f"{e.tshark} -> {', '.join(e.rids)}: " + "; ".join(x for x in (e.flagged, e.positive) if x)
            for e in table]


# -- comparison -----------------------------------------------------------------------------------
def analyse(pcaps: Iterable[Path | str], judgments: list[Judgment],
            judged: Iterable[str] | None = None) -> Comparison:
    """tshark's MPTCP analysis of `pcaps` against `judgments` of them. Give the captures as they
    were given to rules.check, so that connection indexes and vantages match. `judged`: the rule
    IDs the rules judge, whose missing judgment is a disagreement (default: rules.rule_ids() and
    every ID in `judgments`)."""
    names = [str(p) for p in pcaps]
    for name in names:
        if not Path(name).is_file():
            raise InputError(f"{name}: no such capture file")
    conns, owner, vantage = _model(names)
    vantages = [n for n in names if n in set(vantage.values())]
    wanted = {(j.rid, w) for j in judgments if j.outcome == FAIL for w in j.where}
    analyzers = [cls(wanted, conns) for cls in dict.fromkeys(e.analyzer for e in TABLE)]
    # tshark reads the next captures in other processes while this one walks the first.
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {n: pool.submit(tshark_analysis, n) for n in vantages}
        for name in vantages:
            theirs = futures[name].result()
            for p in iter_pcap(name):
                known = owner.get(frozenset(((p.src, p.sport), (p.dst, p.dport))))
                if known is None:
                    continue  # not a subflow of ours
                conn, sub = known
                read = vantage.get((id(sub), 0 if (p.src, p.sport) == sub.tuple4[:2] else 1)) == name
                seen = Seen(Where(name, p.frame), read, conn, sub, _sender_side(sub, p), p, theirs.get(p.frame))
                for a in analyzers:
                    a.see(seen)
    findings: list[Finding] = []
    examined: Counter = Counter()
    for a in analyzers:
        a.finish()
        findings += a.out
        examined.update(a.examined)
    ids = set(rule_ids() if judged is None else judged) | {j.rid for j in judgments}
    return Comparison(findings, compare_findings(findings, judgments, ids), vantages, examined)


def _model(names: list[str]) -> tuple[list[Connection], dict[frozenset, tuple[int | None, Subflow]],
                                      dict[tuple[int, int], str]]:
    """Our model of the captures, built exactly as rules.check builds it (same feed order, so the
    same connection indexes and the same vantage for each direction of each subflow): the
    connections, each subflow's owner by its ends (None: a join matched to no connection), and
    (id(subflow), side of the subflow) -> the capture the model reads that direction from."""
    vantage: dict[tuple[int, int], str] = {}
    orphans: list[Subflow] = []

    def option(conn, sub, where, p, name, f) -> None:  # joins matched to no connection get no segment call
        if conn is None:
            if name == "MPJoinSyn" and where == sub.syn:
                orphans.append(sub)
            vantage.setdefault((id(sub), 0 if (p.src, p.sport) == sub.tuple4[:2] else 1), where.pcap)

    def segment(conn, sub, where, p, side, conn_side) -> None:
        vantage.setdefault((id(sub), side), where.pcap)

    builder = ModelBuilder([option], [segment])
    # rules.check's own merge, on purpose: reading the captures in any other order could
    # number the connections differently and pick other vantages.
    for pcap, p in merged_packets(names):
        builder.feed(pcap, p)
    owner: dict[frozenset, tuple[int | None, Subflow]] = {}
    for i, c in enumerate(builder.connections):
        for sub in c.subflows:
            owner[_ends(sub.tuple4)] = (i, sub)
    for sub in orphans:
        owner.setdefault(_ends(sub.tuple4), (None, sub))
    return builder.connections, owner, vantage


def compare_judgments(pcaps: Iterable[Path | str], judgments: list[Judgment],
                      judged: Iterable[str] | None = None) -> list[RuleDisagreement]:
    """Where tshark's MPTCP analysis of `pcaps` and our `judgments` of them disagree (see analyse)."""
    return analyse(pcaps, judgments, judged).disagreements


def compare_findings(findings: Iterable[Finding], judgments: list[Judgment],
                     judged: set[str]) -> list[RuleDisagreement]:
    """Findings against judgments, by rule ID and connection (the module docstring says how)."""
    by_rule: dict[tuple[str, int | None], list[Judgment]] = {}
    for j in judgments:
        by_rule.setdefault((j.rid, j.connection), []).append(j)
    # Several findings of one kind for one rule on one connection (one per segment, say) make one
    # disagreement, with all their frames.
    grouped: dict[tuple[str, int, str, frozenset[Where] | None], list[Finding]] = {}
    for f in findings:
        grouped.setdefault((f.rid, f.connection, f.kind, f.at), []).append(f)
    out = []
    for (rid, conn, kind, at), group in grouped.items():
        mine = [j for j in by_rule.get((rid, conn), []) if at is None or at & set(j.where)]
        judged_here = [j for j in mine if j.outcome != NOT_EXERCISED]
        frames = tuple(dict.fromkeys(w for f in group for w in f.frames))
        message = group[0].message + (f" (and {len(group) - 1} more)" if len(group) > 1 else "")
        if kind == VIOLATED:
            if any(j.outcome == FAIL for j in judged_here):
                continue  # agreement
            passed = next((j for j in judged_here if j.outcome == PASS), None)
            if passed is not None:
                out.append(RuleDisagreement(rid, conn, frames, message, passed.sentence, PASS))
            elif at is None and rid in judged:
                out.append(RuleDisagreement(rid, conn, frames, message, _unjudged(mine), None))
        elif kind == HOLDS:
            failed = next((j for j in judged_here if j.outcome == FAIL), None)
            if failed is not None:
                out.append(RuleDisagreement(rid, conn, frames, message, failed.sentence, FAIL))
        elif kind == JUDGE and not judged_here and rid in judged:
            out.append(RuleDisagreement(rid, conn, frames, message, _unjudged(mine), None))
    return out


def _unjudged(mine: list[Judgment]) -> str:
    return f"not exercised: {mine[0].sentence}" if mine else "no judgment of this rule on this connection"
