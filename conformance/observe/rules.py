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
from dataclasses import dataclass, field
from pathlib import Path

from conformance.errors import HarnessError
from conformance.observe.model import ACK, SYN, Connection, ModelBuilder, Subflow, Where
from conformance.wire.bulk import Packet, iter_pcap

PASS, FAIL, NOT_EXERCISED = "pass", "fail", "not exercised"


@dataclass(frozen=True)
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
    OptionRule("RC.1.1-L01", "DSS", "a DSS mapping carries a checksum exactly when the handshake negotiated one",
               lambda f, p, c: (f.get("checksum") is not None) == bool(c.checksum),
               lambda f, p, c: bool(f["flags"] & 0x04) and c.checksum is not None),
)


@dataclass
class Judgment:
    rid: str
    outcome: str  # pass | fail | not exercised
    sentence: str
    where: list[Where] = field(default_factory=list)
    connection: int | None = None  # index in the capture's connections

    def __str__(self) -> str:
        frames = ", ".join(str(w) for w in self.where[:3])
        return f"[{self.rid}] {self.outcome}: {self.sentence}" + (f" ({frames})" if frames else "")


@dataclass
class _Tally:
    passed: int = 0
    failed: int = 0
    first_pass: Where | None = None
    first_fail: Where | None = None
    seen: str = ""


class OptionRuleObserver:
    """Streams option rules over the model builder; tallies per connection."""

    def __init__(self, rules: Iterable[OptionRule] = OPTION_RULES):
        self.by_option: dict[str, list[OptionRule]] = {}
        for r in rules:
            self.by_option.setdefault(r.option, []).append(r)
        self.tallies: dict[tuple[int, OptionRule], _Tally] = {}

    def __call__(self, conn: Connection | None, sub: Subflow, where: Where, p: Packet, name: str, f: dict) -> None:
        if conn is None:
            return
        for rule in self.by_option.get(name, ()):
            if not rule.applies(f, p, conn):
                continue
            t = self.tallies.setdefault((id(conn), rule), _Tally())
            if rule.holds(f, p, conn):
                t.passed += 1
                t.first_pass = t.first_pass or where
            else:
                t.failed += 1
                if t.first_fail is None:
                    t.first_fail = where
                    t.seen = ", ".join(f"{k}={v:#x}" if isinstance(v, int) else f"{k}={v}" for k, v in f.items()
                                       if k not in ("kind", "subtype"))

    def judge(self, conns: list[Connection]) -> list[Judgment]:
        out = []
        for i, conn in enumerate(conns):
            for rules in self.by_option.values():
                for rule in rules:
                    t = self.tallies.get((id(conn), rule))
                    if t is None:
                        continue
                    if t.failed:
                        out.append(Judgment(rule.rid, FAIL, f"wants {rule.wants}; {t.failed} of "
                                            f"{t.passed + t.failed} {rule.option} options do not, the first: "
                                            f"{t.seen}", [t.first_fail], i))
                    else:
                        out.append(Judgment(rule.rid, PASS, f"{rule.wants}: all {t.passed} {rule.option} "
                                            "options", [t.first_pass], i))
        return out


# -- connection rules ------------------------------------------------------------------------

def _third_ack(conn: Connection) -> Iterable[Judgment]:
    first = conn.subflows[0]
    if conn.flags[1] is None or conn.fallback is not None:
        return
    if first.ack is not None:
        yield Judgment("R3.1-11", PASS, "the initiator's third ACK (or first data) carries MP_CAPABLE "
                       "with both keys", [first.ack])
    elif first.synack is not None and first.segments > 2:
        yield Judgment("R3.1-11", FAIL, "the SYN/ACK offered MP_CAPABLE but no segment of the initiator "
                       "echoes both keys in MP_CAPABLE", [first.synack])


def _join_hmacs(conn: Connection) -> Iterable[Judgment]:
    for sub in conn.subflows[1:]:
        ok = sub.hmac_ok[0]
        if ok is None or sub.synack is None:
            continue
        if ok:
            yield Judgment("R3.2-03", PASS, "the join SYN/ACK carries the leftmost 64 bits of "
                           "HMAC(Key-B‖Key-A, R-B‖R-A)", [sub.synack])
        else:
            yield Judgment("R3.2-03", FAIL, f"the join SYN/ACK's truncated HMAC {sub.synack_hmac:#x} does not "
                           "verify with the connection's keys and the nonces", [sub.synack])


def _add_addr(conn: Connection) -> Iterable[Judgment]:
    adds = [e for e in conn.events if e.kind == "ADD_ADDR"]
    for e in adds:
        if e.hmac_ok is not None:
            yield Judgment("R3.4.1-L02", PASS if e.hmac_ok else FAIL,
                           f"ADD_ADDR id {e.address_id} {e.address}: truncated HMAC "
                           + ("verifies" if e.hmac_ok else "does not verify") + " with the sender's and "
                           "receiver's keys (zero port when none)", [e.where])
        echo = next((x for x in conn.events if x.kind == "echo" and x.from_initiator != e.from_initiator
                     and (x.address_id, x.address, x.port) == (e.address_id, e.address, e.port)), None)
        if echo is not None:
            yield Judgment("R3.4.1-L01", PASS, f"ADD_ADDR id {e.address_id} {e.address} is echoed with E=1",
                           [e.where, echo.where])
        elif conn.subflows[0].segments > 10:
            yield Judgment("R3.4.1-L01", FAIL, f"ADD_ADDR id {e.address_id} {e.address} is never echoed by "
                           "the peer", [e.where])


def _idsn(conn: Connection) -> Iterable[Judgment]:
    """The data of each side starts at IDSN+1 (§3.1, §3.3.1): its lowest mapped DSN is IDSN+1, or
    just after the data its MP_CAPABLE carried (mapped there implicitly)."""
    for side, who in ((0, "initiator"), (1, "listener")):
        low, idsn = conn.lowest_dsn[side], conn.idsn(side)
        if low is None or idsn is None:
            continue
        where, dsn = low
        start = (idsn + 1) % 2**64
        allowed = {start} | ({(start + conn.mpc_data[side]) % 2**64} if conn.mpc_data[side] else set())
        after_mpc = f" (or {max(allowed):#x}, after its MP_CAPABLE's data)" if len(allowed) > 1 else ""
        yield Judgment("R3.1-34", PASS if dsn in allowed else FAIL,
                       f"the {who}'s lowest mapped DSN is {dsn:#x}; IDSN+1 from the low 64 bits of SHA-256 of "
                       f"its key is {start:#x}{after_mpc}", [where])


def _join_ports(conn: Connection) -> Iterable[Judgment]:
    first = conn.subflows[0].tuple4
    announced = {(e.address, e.port) for e in conn.events if e.kind == "ADD_ADDR" and e.port}
    for sub in conn.subflows[1:]:
        if (sub.tuple4[2], sub.tuple4[3]) in announced:
            continue  # joined to a port an ADD_ADDR announced: that is where it should go
        to_listener = sub.responder_side == 1
        want = first[3] if to_listener else first[1]
        yield Judgment("R3.9.1-02", PASS if sub.tuple4[3] == want else FAIL,
                       f"the join SYN goes to port {sub.tuple4[3]}; the first subflow's port on that host is "
                       f"{want}", [sub.syn])


def _address_ids(conn: Connection) -> Iterable[Judgment]:
    for side in (0, 1):
        pairs = {(sub.address_ids[0], sub.tuple4[0]) for sub in conn.subflows[1:]
                 if (1 - sub.responder_side) == side and sub.address_ids[0] is not None}
        if not pairs:
            continue
        ids = {i for i, _ in pairs}
        addrs = {a for _, a in pairs}
        ok = len(ids) == len(pairs) == len(addrs)
        where = [s.syn for s in conn.subflows[1:] if (1 - s.responder_side) == side]
        yield Judgment("R3.2-L01", PASS if ok else FAIL,
                       "MP_JOIN address IDs map one to one onto source addresses: "
                       + ", ".join(f"id {i} = {a}" for i, a in sorted(pairs, key=str)), where)


def _fastclose_key(conn: Connection) -> Iterable[Judgment]:
    for where, sender, key in conn.fastclose:
        peer = conn.keys[1 - sender]
        if peer is None:
            continue
        yield Judgment("R3.5-L04", PASS if key == peer else FAIL,
                       f"MP_FASTCLOSE carries key {key:#x}; the peer's key from the handshake is {peer:#x}",
                       [where])


def _address_rebinding(conn: Connection) -> Iterable[Judgment]:
    """An announced address ID keeps its address until the sender withdraws it (§3.4.1)."""
    bound: dict[tuple[bool, int | None], tuple[str | None, Where]] = {}
    withdrawn: dict[tuple[bool, int | None], tuple[str | None, Where]] = {}
    for e in conn.events:
        key = (e.from_initiator, e.address_id)
        if e.kind == "REMOVE_ADDR":
            if key in bound:
                withdrawn[key] = bound.pop(key)
        elif e.kind == "ADD_ADDR":
            before = bound.get(key)
            if before is None:
                old = withdrawn.pop(key, None)
                if old is not None and old[0] != e.address:
                    yield Judgment("R3.4.1-16", PASS, f"address ID {e.address_id} is rebound from {old[0]} to "
                                   f"{e.address} only after a REMOVE_ADDR", [old[1], e.where])
                bound[key] = (e.address, e.where)
                continue
            same = before[0] == e.address
            yield Judgment("R3.4.1-14", PASS if same else FAIL,
                           f"ADD_ADDR id {e.address_id} is announced again with {e.address}; it was {before[0]}",
                           [before[1], e.where])
            if not same:
                yield Judgment("R3.4.1-16", FAIL, f"address ID {e.address_id} is rebound from {before[0]} to "
                               f"{e.address} without a REMOVE_ADDR first", [before[1], e.where])
                bound[key] = (e.address, e.where)


# Each connection rule with the requirement IDs it judges (so the list of judged IDs is derived).
CONNECTION_RULES: tuple[tuple[tuple[str, ...], Callable[[Connection], Iterable[Judgment]]], ...] = (
    (("R3.1-11",), _third_ack), (("R3.2-03",), _join_hmacs), (("R3.4.1-L01", "R3.4.1-L02"), _add_addr),
    (("R3.1-34",), _idsn), (("R3.9.1-02",), _join_ports), (("R3.2-L01",), _address_ids),
    (("R3.5-L04",), _fastclose_key), (("R3.4.1-14", "R3.4.1-16"), _address_rebinding),
)


def check(pcaps: Iterable[Path | str]) -> tuple[list[Connection], list[Judgment]]:
    """Rebuild the connections of these captures and judge every passive rule on them."""
    observer = OptionRuleObserver()
    builder = ModelBuilder([observer])
    for pcap in pcaps:
        for p in iter_pcap(pcap):
            builder.feed(str(pcap), p)
    conns = builder.connections
    judgments = observer.judge(conns)
    for i, conn in enumerate(conns):
        for rids, rule in CONNECTION_RULES:
            for j in rule(conn):
                if j.rid not in rids:  # a rule reporting under an ID it does not declare is our bug
                    raise HarnessError(f"{rule.__name__} judged {j.rid}, not one of its IDs {rids}")
                j.connection = i
                judgments.append(j)
    return conns, judgments


def rule_ids() -> set[str]:
    """Every requirement ID some passive rule judges."""
    return {r.rid for r in OPTION_RULES} | {rid for rids, _ in CONNECTION_RULES for rid in rids}
