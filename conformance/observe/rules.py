"""Passive rules: RFC 8684 requirements judged from the wire alone, per connection.

Two kinds, both declarative data over a small engine:
- option rules look at each MPTCP option as the capture streams past (a predicate on its
  fields and the segment that carries it); they are tallied per connection, keeping only the
  first frame that passes and the first that fails;
- connection rules look at the rebuilt connection (conformance.observe.model) at the end.

Each judgment is pass, fail or not exercised, with the frame that shows it and a sentence
saying what was seen and what the requirement wants."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from conformance.errors import HarnessError
from conformance.observe.connection_rules import CAPTURE_RULES, CONNECTION_RULES
from conformance.observe.judgment import FAIL, NOT_EXERCISED, PASS, Judgment, Tally
from conformance.observe.model import ACK, RST, SYN, Connection, ModelBuilder, Subflow, Where, merged_packets
from conformance.observe.stream_rules import stream_rule_ids, stream_rules
from conformance.wire.bulk import Packet

__all__ = ["FAIL", "NOT_EXERCISED", "PASS", "Judgment", "check", "rule_ids"]


@dataclass(frozen=True, eq=False)  # hashed by identity: rules are table entries, looked up per option
class OptionRule:
    rid: str
    option: str  # our class name (MPCapable, DSS, ...)
    wants: str  # what the requirement wants, as a sentence fragment
    holds: Callable[[dict, Packet, Connection], bool]
    applies: Callable[[dict, Packet, Connection], bool] = lambda f, p, c: True


def _is_syn(p: Packet) -> bool:
    return p.flags & (SYN | ACK) == SYN


def _v1(f: dict, p: Packet, c: Connection) -> bool:
    return f.get("version") == 1


OPTION_RULES: tuple[OptionRule, ...] = (
    OptionRule("R3.1-01", "MPCapable", "the SYN's MP_CAPABLE offers version 1, the highest this suite knows",
               lambda f, p, c: f["version"] == 1, lambda f, p, c: _is_syn(p)),
    OptionRule("R3.1-15", "MPCapable", "MP_CAPABLE flag B (extensibility) is 0",
               lambda f, p, c: not f["flags"] & 0x40, _v1),
    OptionRule("R3.1-18", "MPCapable", "MP_CAPABLE crypto flags are H=1 and D..G=0",
               lambda f, p, c: f["flags"] & 0x1F == 0x01, _v1),
    OptionRule("R3.1-19", "MPCapable", "MP_CAPABLE selects at least one crypto algorithm (a flag of D..H)",
               lambda f, p, c: bool(f["flags"] & 0x1F)),
    OptionRule("R3.2-02", "MPJoinSyn", "the reserved bits of MP_JOIN on a SYN are 0",
               lambda f, p, c: f["reserved"] == 0),
    OptionRule("R3.2-02", "MPJoinSynAck", "the reserved bits of MP_JOIN on a SYN/ACK are 0",
               lambda f, p, c: f["reserved"] == 0),
    OptionRule("R3.2-06", "MPJoinAck", "the reserved bits of MP_JOIN on the third ACK are 0",
               lambda f, p, c: f["reserved"] == 0),
    OptionRule("R3.3-01", "DSS", "the reserved bits of DSS are 0", lambda f, p, c: f["reserved"] == 0),
    OptionRule("R3.3.3-01", "DSS", "a DATA_FIN without payload maps SSN 0 with data-level length 1",
               lambda f, p, c: f.get("ssn") == 0 and f.get("data_level_length") == 1,
               lambda f, p, c: bool(f["flags"] & 0x14 == 0x14) and p.payload_len == 0),
    OptionRule("R3.4.1-10", "AddAddr", "the unassigned ADD_ADDR flag bits are 0",
               lambda f, p, c: f["reserved"] == 0),
    OptionRule("R3.6-07", "MPTCPRst", "the undefined MP_TCPRST flag bits U, V, W are 0",
               lambda f, p, c: not f["flags"] & 0x0E),
    OptionRule("R3.1-14", "MPCapable", "the handshake's MP_CAPABLE sets flag A (checksums), unless an "
               "administrator turned checksums off", lambda f, p, c: bool(f["flags"] & 0x80),
               lambda f, p, c: bool(p.flags & SYN)),
    OptionRule("R3.6-01", "MPTCPRst", "MP_TCPRST rides on a RST", lambda f, p, c: bool(p.flags & RST)),
    OptionRule("R3.7-L02", "MPFail", "MP_FAIL is 12 bytes and carries the full 64-bit DSN",
               lambda f, p, c: True),
    OptionRule("R3.7-L02", "MPTCPMalformed", "MP_FAIL is 12 bytes and carries the full 64-bit DSN",
               lambda f, p, c: False, lambda f, p, c: bool(f.get("data")) and f["data"][0] >> 4 == 6),
    OptionRule("RC.1.1-L01", "DSS", "a DSS mapping carries a checksum exactly when the handshake negotiated one",
               lambda f, p, c: (f.get("checksum") is not None) == bool(c.checksum),
               lambda f, p, c: bool(f["flags"] & 0x04) and c.checksum is not None),
)


class OptionRuleObserver:
    """Streams option rules over the model builder; tallies per connection."""

    def __init__(self, rules: Iterable[OptionRule] = OPTION_RULES):
        self.by_option: dict[str, list[OptionRule]] = {}
        for r in rules:
            self.by_option.setdefault(r.option, []).append(r)
        self.tallies: dict[tuple[int, OptionRule], Tally] = {}
        # What the rules say of one option: it depends on the option's fields (decoded options are
        # shared between packets with the same bytes, hence id(f), kept alive by the value), the
        # segment's SYN/ACK/RST flags, whether it has payload, and the connection's checksum use.
        self._verdicts: dict[tuple, tuple[dict, list[tuple[OptionRule, bool]]]] = {}

    def __call__(self, conn: Connection | None, sub: Subflow, where: Where, p: Packet, name: str, f: dict) -> None:
        if conn is None:
            return
        key = (id(f), p.flags & 0x17, not p.payload_len, conn.checksum)
        memo = self._verdicts.get(key)
        if memo is None or memo[0] is not f:
            if len(self._verdicts) > 4096:
                self._verdicts.clear()
            rules = [rule for rule in self.by_option.get(name, ()) if rule.applies(f, p, conn)]
            memo = self._verdicts[key] = (f, [(rule, bool(rule.holds(f, p, conn))) for rule in rules])
        tallies = self.tallies
        for rule, holds in memo[1]:
            t = tallies.get((id(conn), rule))
            if t is None:
                t = tallies[(id(conn), rule)] = Tally()
            if holds:
                t.passed += 1
                if t.first_pass is None:
                    t.first_pass = where
            elif t.first_fail is None:
                t.bad(where, ", ".join(f"{k}={v:#x}" if isinstance(v, int) else f"{k}={v}" for k, v in f.items()
                                       if k not in ("kind", "subtype")))
            else:
                t.failed += 1

    def judge(self, conns: list[Connection]) -> list[Judgment]:
        out = []
        for i, conn in enumerate(conns):
            for rules in self.by_option.values():
                for rule in rules:
                    t = self.tallies.get((id(conn), rule))
                    if t is None:
                        continue
                    j = t.judgment(rule.rid, rule.wants, f"{rule.option} options")
                    j.connection = i
                    out.append(j)
        return out


def check(pcaps: Iterable[Path | str], *, complete: bool = False) -> tuple[list[Connection], list[Judgment]]:
    """Rebuild the connections of these captures and judge every passive rule on them.

    `complete`: the captures show every subflow of every connection (all links of a topology, or
    all interfaces of an endpoint), so data the peer never mapped in them was never sent."""
    observer = OptionRuleObserver()
    streams = stream_rules(complete)
    builder = ModelBuilder([observer], streams)
    for pcap, p in merged_packets(pcaps):
        builder.feed(pcap, p)
    conns = builder.finish()
    judgments = observer.judge(conns)

    def declared(rids: tuple[str, ...], name: str, j: Judgment) -> Judgment:
        if j.rid not in rids:  # a rule reporting under an ID it does not declare is our bug
            raise HarnessError(f"{name} judged {j.rid}, not one of its IDs {rids}")
        return j

    for i, conn in enumerate(conns):
        for rids, rule in CONNECTION_RULES:
            for j in rule(conn):
                declared(rids, rule.__name__, j).connection = i
                judgments.append(j)
        for stream in streams:
            for j in stream.judge(conn):
                declared(stream.ids, type(stream).__name__, j).connection = i
                judgments.append(j)
    for rids, capture_rule in CAPTURE_RULES:
        for i, j in capture_rule(conns, builder.orphans):
            declared(rids, capture_rule.__name__, j).connection = i
            judgments.append(j)
    return conns, judgments


def rule_ids() -> set[str]:
    """Every requirement ID some passive rule judges."""
    return ({r.rid for r in OPTION_RULES} | {rid for rids, _ in CONNECTION_RULES for rid in rids}
            | {rid for rids, _ in CAPTURE_RULES for rid in rids} | stream_rule_ids())
