"""Passive rules judged on a rebuilt connection at the end of the capture (conformance.observe.model):
handshake and keys, joins, addresses, ports and closing. CAPTURE_RULES see every connection of the
capture at once (keys and ISNs compared across connections, joins that matched none)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from itertools import pairwise

from conformance.observe.judgment import FAIL, PASS, Judgment
from conformance.observe.model import Connection, Subflow, Where


def _third_ack(conn: Connection) -> Iterable[Judgment]:
    first = conn.subflows[0]
    if conn.flags[1] is None or conn.fallback is not None:
        return
    if first.ack is not None and conn.echoed_key != conn.keys[1]:
        yield Judgment("R3.1-11", FAIL, f"the initiator's third ACK echoes key {conn.echoed_key:#x} as the "
                       f"listener's; its SYN/ACK sent {conn.keys[1]:#x}", [first.ack])
    elif first.ack is not None:
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
        # Past a NAT the first subflow has other ports: the joining host knows the one it sees.
        wanted = {t[3] if to_listener else t[1] for t in (first, *conn.subflows[0].translated)}
        want = " or ".join(str(w) for w in sorted(wanted))
        yield Judgment("R3.9.1-02", PASS if sub.tuple4[3] in wanted else FAIL,
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


def _sub_side(sub: Subflow, cs: int) -> int:
    """The side of `sub` (0 its initiator) that connection side `cs` holds."""
    initiator = 0 if sub.initial else 1 - sub.responder_side
    return 0 if cs == initiator else 1


def _checksums(conn: Connection) -> Iterable[Judgment]:
    if conn.checksum is None or conn.fallback is not None:
        return
    yield Judgment("R3.3.1-04", PASS if conn.checksum else FAIL,
                   "the handshake " + ("negotiates" if conn.checksum else "does not negotiate")
                   + " DSS checksums; "
                   "they are recommended unless the path is known to have no payload-changing middlebox",
                   [w for w in (conn.syn, conn.subflows[0].synack) if w])


def _close(conn: Connection) -> Iterable[Judgment]:
    """§3.3.3: once a host's DATA_FIN is Data-ACKed its subflows close by FIN (a RST only for a
    subflow still holding reinjected data); hosts FIN every subflow at close; the connection is
    closed once both DATA_FINs are Data-ACKed."""
    if conn.fallback is not None or conn.fastclose:
        return
    for cs, who in ((0, "initiator"), (1, "listener")):
        acked, closing = conn.data_fin_acked[cs], conn.data_fin[cs]
        if closing is None:
            continue
        for sub in conn.subflows:
            if not sub.established:
                continue  # a join refused or reset in its handshake was never a subflow to close
            mine = _sub_side(sub, cs)
            fin, rst = sub.fin_where[mine], sub.rst
            # Only a reset at close counts: one before this host's DATA_FIN ended a failed subflow.
            reset_by_me = (rst is not None and sub.rst_side == mine and (fin is None or rst.time < fin.time)
                           and rst.time >= closing.time)
            if reset_by_me and any(on_rst and w.pcap == rst.pcap and w.frame == rst.frame
                                   for w, _, _, on_rst in conn.mp_fail_at):
                continue  # the RST + MP_FAIL that §3.7 asks for on a checksum failure, not a close
            if reset_by_me and sub.rst_reason not in (None, 0, 4):
                continue  # MP_TCPRST names an error (§3.6): a broken subflow, not the way it closes
            if fin is not None and (rst is None or fin.time <= rst.time):
                yield Judgment("R3.3.3-04", PASS, f"the {who} closes subflow {_ports(sub)} with a FIN", [fin])
                if acked is not None:
                    yield Judgment("R3.3.3-03", PASS, f"after its DATA_FIN was Data-ACKed, the {who} closes "
                                   f"subflow {_ports(sub)} with a FIN", [acked, fin])
            elif reset_by_me:
                outstanding = sub.rst_reason == 4
                yield Judgment("R3.3.3-04", FAIL, f"at close the {who} resets {_ports(sub)} without a FIN; "
                               "each host should FIN every subflow", [rst])
                if acked is not None and rst.time >= acked.time and not outstanding:
                    yield Judgment("R3.3.3-03", FAIL, f"after its DATA_FIN was Data-ACKed, the {who} resets "
                                   f"{_ports(sub)} instead of shutting it with a FIN exchange", [acked, rst])
    closed = all(s.fin[0] and s.fin[1] and s.rst is None for s in conn.subflows)
    if closed and any(conn.data_fin):
        unacked = [who for cs, who in ((0, "initiator"), (1, "listener")) if conn.data_fin_acked[cs] is None]
        last = max((w for s in conn.subflows for w in s.fin_where if w), key=lambda w: w.time)
        yield Judgment("R3.3.3-L02", FAIL if unacked else PASS,
                       "every subflow is closed by FIN, " + (f"but the DATA_FIN of the {' and '.join(unacked)} is "
                                                            "never Data-ACKed" if unacked else
                                                            "and both DATA_FINs were Data-ACKed"),
                       [w for w in (*conn.data_fin_acked, last) if w])


def _ports(sub: Subflow) -> str:
    a, ap, b, bp = sub.tuple4
    return f"{a}:{ap}-{b}:{bp}"


def _resets(conn: Connection) -> Iterable[Judgment]:
    """§3.3.3 MAY and §3.3.6: what a RST's MP_TCPRST reason claims matches what the wire shows."""
    for sub in conn.subflows:
        if sub.rst is None or sub.rst_reason_where is None:
            continue
        sender = sub.rst_side if sub.rst_side is not None else 0
        if sub.rst_reason == 4:  # too much outstanding data
            high, acked = sub.snd_max[sender], sub.ack_max[1 - sender]
            waiting = high is not None and acked is not None and high != acked
            yield Judgment("R3.3.3-05", PASS if waiting else FAIL,
                           f"subflow {_ports(sub)} is reset with 'too much outstanding data'" +
                           (" while its data is unacknowledged" if waiting else
                            ", yet all it sent was acknowledged"), [sub.rst_reason_where])
        retrans = sub.retransmissions[sender]
        if sub.rst_reason == 5:  # unacceptable performance
            yield Judgment("R3.3.6-04", PASS, f"subflow {_ports(sub)} is reset for unacceptable performance after "
                           f"{retrans} retransmissions", [sub.rst_reason_where])
            yield Judgment("R3.3.6-05", PASS, f"the RST of badly performing {_ports(sub)} carries MP_TCPRST "
                           "'unacceptable performance'", [sub.rst_reason_where])
    for sub in conn.subflows:
        sender = sub.rst_side if sub.rst_side is not None else 0
        if (sub.rst is not None and sub.rst_reason != 5 and sub.retransmissions[sender] >= 3
                and not sub.fin[sender] and conn.last_time > sub.rst.time and conn.data_fin[0] is None
                and any(o is not sub and o.last_time > sub.rst.time for o in conn.subflows)):
            yield Judgment("R3.3.6-05", FAIL, f"{_ports(sub)} is reset after {sub.retransmissions[sender]} "
                           "retransmissions while the connection goes on, with MP_TCPRST reason "
                           f"{sub.rst_reason}; 'unacceptable performance' (5) is wanted", [sub.rst])


def _join_source_ports(conn: Connection) -> Iterable[Judgment]:
    first = conn.subflows[0].tuple4
    announced = {(e.address, e.port) for e in conn.events if e.kind == "ADD_ADDR" and e.port}
    for sub in conn.subflows[1:]:
        from_initiator = sub.responder_side == 1
        own, peer = (first[1], first[3]) if from_initiator else (first[3], first[1])
        same_src = sub.tuple4[1] == own
        same_dst = sub.tuple4[3] == peer or (sub.tuple4[2], sub.tuple4[3]) in announced
        yield Judgment("R3.9.1-03", PASS if same_src else FAIL,
                       f"the join SYN leaves from port {sub.tuple4[1]}; the first subflow's port on that host is "
                       f"{own}", [sub.syn])
        yield Judgment("R3.9.1-01", PASS if same_src and same_dst else FAIL,
                       f"the join uses ports {sub.tuple4[1]} -> {sub.tuple4[3]}; the connection's are {own} -> "
                       f"{peer}", [sub.syn])


def _one_subflow_per_pair(conn: Connection) -> Iterable[Judgment]:
    """§3.9.2: both ends joining the same address pair at once leaves two subflows; randomised
    delays are recommended so that one results."""
    joins = conn.subflows[1:]
    if not joins:
        return
    clash = None
    for i, a in enumerate(conn.subflows):
        for b in conn.subflows[i + 1:]:
            same_pair = {a.tuple4[0], a.tuple4[2]} == {b.tuple4[0], b.tuple4[2]}
            crossed = a.tuple4[0] == b.tuple4[2]
            if same_pair and crossed and b.syn.time <= a.last_time:
                clash = (a, b)
    if clash:
        a, b = clash
        yield Judgment("R3.9.2-03", FAIL, f"both hosts open a subflow between {a.tuple4[0]} and {a.tuple4[2]} "
                       "(one each way) and both live on", [a.syn, b.syn])
    else:
        yield Judgment("R3.9.2-03", PASS, f"{len(conn.subflows)} subflows, one per address pair", [joins[0].syn])


def _address_ids_per_sender(conn: Connection) -> Iterable[Judgment]:
    """§3.4.1: within a connection, an address ID names one address of its sender (ADD_ADDR,
    MP_JOIN and the initial subflow's implicit ID 0 together), until REMOVE_ADDR frees it."""
    timeline: list[tuple[float, str, bool, int | None, str | None, Where]] = []
    first = conn.subflows[0]
    timeline.append((first.syn.time, "bind", True, 0, first.tuple4[0], first.syn))
    if first.synack:
        timeline.append((first.synack.time, "bind", False, 0, first.tuple4[2], first.synack))
    for sub in conn.subflows[1:]:
        from_initiator = sub.responder_side == 1
        if sub.address_ids[0] is not None:
            timeline.append((sub.syn.time, "bind", from_initiator, sub.address_ids[0], sub.tuple4[0], sub.syn))
        if sub.address_ids[1] is not None and sub.synack:
            timeline.append((sub.synack.time, "bind", not from_initiator, sub.address_ids[1], sub.tuple4[2],
                             sub.synack))
    for e in conn.events:
        if e.kind in ("ADD_ADDR", "REMOVE_ADDR"):
            timeline.append((e.where.time, "bind" if e.kind == "ADD_ADDR" else "free", e.from_initiator,
                             e.address_id, e.address, e.where))
    timeline.sort(key=lambda t: t[0])
    ids: dict[tuple[bool, int | None], tuple[str | None, Where]] = {}
    bad = None
    checked = 0
    for _, kind, sender, aid, addr, where in timeline:
        key = (sender, aid)
        if kind == "free":
            ids.pop(key, None)
            continue
        checked += 1
        known = ids.get(key)
        if known is not None and known[0] != addr:
            bad = bad or (f"address ID {aid} names {known[0]} and then {addr}", [known[1], where])
        other = next((k for k, v in ids.items() if k[0] == sender and v[0] == addr and k != key), None)
        if other is not None and known is None:
            bad = bad or (f"address {addr} has ID {other[1]} and then ID {aid}", [ids[other][1], where])
        ids[key] = (addr, where)
    if checked > 2 or bad:
        yield Judgment("R3.4.1-02", FAIL if bad else PASS,
                       bad[0] if bad else f"{checked} address ID uses, each ID naming one address of its sender",
                       bad[1] if bad else [first.syn])


def _address_courtesies(conn: Connection) -> Iterable[Judgment]:
    """MAYs of §3.4: an advertisement sent again after it was echoed; MP_PRIO before REMOVE_ADDR."""
    echoed: set[tuple[bool, int | None, str | None]] = set()
    prio: dict[bool, Where] = {}
    for e in conn.events:
        key = (e.from_initiator, e.address_id, e.address)
        if e.kind == "echo":
            echoed.add((not e.from_initiator, e.address_id, e.address))
        elif e.kind == "ADD_ADDR" and key in echoed:
            yield Judgment("R3.4.1-06", PASS, f"ADD_ADDR id {e.address_id} {e.address} is sent again after its "
                           "echo, as a host may", [e.where])
            echoed.discard(key)
        elif e.kind == "MP_PRIO":
            prio[e.from_initiator] = e.where
        elif e.kind == "REMOVE_ADDR" and e.from_initiator in prio:
            yield Judgment("R3.4.2-07", PASS, f"MP_PRIO precedes REMOVE_ADDR id {e.address_id} from the same host",
                           [prio[e.from_initiator], e.where])


def _infinite_after_fail(conn: Connection) -> Iterable[Judgment]:
    """§3.7: after a RST with MP_FAIL, a new subflow should start with an infinite mapping from the
    DSN the MP_FAIL named."""
    for where, detector, dsn, on_rst in conn.mp_fail_at:
        if not on_rst:
            continue
        sender = 1 - detector
        for sub in conn.subflows:
            if sub.syn.time <= where.time or sub.first_mapping is None:
                continue
            mwhere, mdsn, length = sub.first_mapping
            ok = length == 0 and mdsn == dsn
            yield Judgment("R3.7-14", PASS if ok else FAIL,
                           f"the first mapping on the subflow opened after MP_FAIL (DSN {dsn:#x}) is "
                           + (f"infinite from {mdsn:#x}" if length == 0 else f"DSN {mdsn:#x} length {length}")
                           + f" from the {'initiator' if sender == 0 else 'listener'}", [where, mwhere])
            break


def _removals(conn: Connection) -> Iterable[Judgment]:
    """§3.4.2: the subflows of an address withdrawn by REMOVE_ADDR are reset (a courtesy to
    middleboxes), and REMOVE_ADDR is never the only thing that ends a subflow still at work: its
    owner closes it (FIN, or RST as above)."""
    for e in conn.events:
        if e.kind != "REMOVE_ADDR" or e.address_id is None:
            continue
        owner = 0 if e.from_initiator else 1
        for sub in conn.subflows:
            mine = _sub_side(sub, owner)
            aid = 0 if sub.initial else sub.address_ids[mine]
            if aid != e.address_id or not sub.established or sub.syn.time > e.where.time:
                continue
            reset, fin = sub.rst, sub.fin_where[mine]
            ended = reset or fin
            lingers = ended is None and sub.last_time > e.where.time + 2.0
            if reset is not None:
                yield Judgment("R3.4.2-09", PASS, f"subflow {_ports(sub)} of withdrawn address ID "
                               f"{e.address_id} is reset", [e.where, reset])
            elif fin is not None or lingers:
                yield Judgment("R3.4.2-09", FAIL, f"subflow {_ports(sub)} of withdrawn address ID "
                               f"{e.address_id} is " + ("closed by FIN" if fin else "still in use 2 s later")
                               + ", not reset",
                               [e.where, *([fin] if fin else [])])
            if lingers:
                yield Judgment("R3.4.2-10", FAIL, f"REMOVE_ADDR ID {e.address_id} is all that ends subflow "
                               f"{_ports(sub)}, still at work 2 s later: no FIN or RST from its owner", [e.where])
            elif ended is not None and (reset is None or sub.rst_side == mine or fin is not None):
                how = "RST" if reset is not None else "FIN"
                yield Judgment("R3.4.2-10", PASS, f"subflow {_ports(sub)} is ended by its owner ({how}), not by "
                               f"REMOVE_ADDR ID {e.address_id} alone", [e.where, ended])


# Each connection rule with the requirement IDs it judges (so the list of judged IDs is derived).
CONNECTION_RULES: tuple[tuple[tuple[str, ...], Callable[[Connection], Iterable[Judgment]]], ...] = (
    (("R3.1-11",), _third_ack), (("R3.2-03",), _join_hmacs), (("R3.4.1-L01", "R3.4.1-L02"), _add_addr),
    (("R3.1-34",), _idsn), (("R3.9.1-02",), _join_ports), (("R3.2-L01",), _address_ids),
    (("R3.5-L04",), _fastclose_key), (("R3.4.1-14", "R3.4.1-16"), _address_rebinding),
    (("R3.3.1-04",), _checksums), (("R3.3.3-03", "R3.3.3-04", "R3.3.3-L02"), _close),
    (("R3.3.3-05", "R3.3.6-04", "R3.3.6-05"), _resets), (("R3.9.1-01", "R3.9.1-03"), _join_source_ports),
    (("R3.9.2-03",), _one_subflow_per_pair), (("R3.4.1-02",), _address_ids_per_sender),
    (("R3.4.1-06", "R3.4.2-07"), _address_courtesies), (("R3.7-14",), _infinite_after_fail),
    (("R3.4.2-09", "R3.4.2-10"), _removals),
)


# -- capture rules: every connection of the capture at once ---------------------------------------

def _digest(key: int, order: str = "big") -> bytes:
    return hashlib.sha256(key.to_bytes(8, order)).digest()


def _hashing(conns: list[Connection], orphans: list[Subflow]) -> Iterable[tuple[int, Judgment]]:
    """§3.1: token = top 32 bits and IDSN = low 64 bits of SHA-256 over the key in network order.
    A join naming a token computed another way (and so matching no connection) or data starting at
    an IDSN computed another way says which of these went wrong."""
    for i, conn in enumerate(conns):
        for sub in conn.subflows[1:]:
            if sub.token is not None:
                yield i, Judgment("R3.1-21", PASS, f"the join's token {sub.token:#010x} is the top 32 "
                                  "bits of SHA-256 over the responder's key", [sub.syn])
                yield i, Judgment("R3.1-23", PASS, "the token is hashed over the key in network byte order",
                                  [sub.syn])
                break
        for side in (0, 1):
            low, key = conn.lowest_dsn[side], conn.keys[side]
            if low is None or key is None:
                continue
            where, dsn = low
            right = (int.from_bytes(_digest(key)[-8:], "big") + 1) % 2**64
            starts = {right, (right + (conn.mpc_data[side] or 0)) % 2**64}
            if dsn in starts:
                for rid, what in (("R3.1-22", "the low 64 bits of SHA-256 over the key"),
                                  ("R3.1-24", "the rightmost 8 bytes of the digest"),
                                  ("R3.1-23", "a hash of the key in network byte order")):
                    yield i, Judgment(rid, PASS, f"data starts at DSN {dsn:#x}, one after the IDSN from {what}",
                                      [where])
                continue
            alternatives = (("R3.1-24", int.from_bytes(_digest(key)[:8], "big"), "the leftmost 8 bytes"),
                            ("R3.1-23", int.from_bytes(_digest(key, "little")[-8:], "big"),
                             "the key hashed in little-endian order"))
            rid, why = next(((r, w) for r, v, w in alternatives if (v + 1) % 2**64 == dsn),
                            ("R3.1-22", "no known way"))
            yield i, Judgment(rid, FAIL, f"data starts at DSN {dsn:#x}, derived from {why}; IDSN+1 is {right:#x}",
                              [where])
    for orphan in orphans:
        for i, conn in enumerate(conns):
            for key in conn.keys:
                if key is None:
                    continue
                if orphan.token == int.from_bytes(_digest(key)[-4:], "big"):
                    yield i, Judgment("R3.1-21", FAIL, f"a join names token {orphan.token:#010x}, the LEAST "
                                      "significant 32 bits of SHA-256 over a key of this connection", [orphan.syn])
                if orphan.token == int.from_bytes(_digest(key, "little")[:4], "big"):
                    yield i, Judgment("R3.1-23", FAIL, f"a join names token {orphan.token:#010x}, from a key of "
                                      "this connection hashed in little-endian order", [orphan.syn])


def _host_of(conn: Connection, side: int) -> str:
    first = conn.subflows[0].tuple4
    return first[0] if side == 0 else first[2]


def _keys(conns: list[Connection], orphans: list[Subflow]) -> Iterable[tuple[int, Judgment]]:
    """§3.1: keys are unpredictable (not zero, not the peer's, not a near neighbour of another of
    the host's keys) and a host never reuses one on two connections open at the same time."""
    for i, conn in enumerate(conns):
        if None in conn.keys:
            continue
        where = [w for w in (conn.subflows[0].synack, conn.subflows[0].ack) if w]
        for side in (0, 1):
            key, host = conn.keys[side], _host_of(conn, side)
            others = [(j, o, s) for j, o in enumerate(conns) if j != i for s in (0, 1)
                      if o.keys[s] is not None and _host_of(o, s) == host]
            problem = None
            if key == 0:
                problem = "the key is zero"
            elif key == conn.keys[1 - side]:
                problem = "the key equals the peer's"
            else:
                near = next(((o, s) for _, o, s in others if abs(o.keys[s] - key) < 2**32), None)
                if near is not None:
                    problem = (f"the key {key:#018x} is within 2^32 of {near[0].keys[near[1]]:#018x}, another "
                               "connection's key of the same host")
            yield i, Judgment("R3.1-06", FAIL if problem else PASS,
                              f"{host}'s key: " + (problem or f"nonzero, unlike its peer's and {len(others)} "
                                                              "other keys of the host"), where)
            for j, o, s in others:
                if j < i or not (o.first_time <= conn.last_time and conn.first_time <= o.last_time):
                    continue
                same = o.keys[s] == key
                yield i, Judgment("R3.1-07", FAIL if same else PASS,
                                  f"{host} uses " + ("the same key" if same else "different keys")
                                  + f" on two connections open at once (to {_host_of(conn, 1 - side)} and "
                                    f"{_host_of(o, 1 - s)})", [*where, o.syn])


def _isns(conns: list[Connection], orphans: list[Subflow]) -> Iterable[tuple[int, Judgment]]:
    """§3 (RFC 6528): a host's subflow ISNs should be unpredictable: never repeated, and not close
    neighbours (a counter) within one connection."""
    for i, conn in enumerate(conns):
        for cs in (0, 1):
            isns = [(s.isn[_sub_side(s, cs)], s) for s in conn.subflows if s.isn[_sub_side(s, cs)] is not None]
            if len(isns) < 2:
                continue
            values = sorted(v for v, _ in isns)
            gaps = [(b - a) % 2**32 for a, b in pairwise(values)]
            gaps.append((values[0] - values[-1]) % 2**32)
            tight = min(gaps)
            host = _host_of(conn, cs)
            yield i, Judgment("R3-04", PASS if tight >= 2**16 else FAIL,
                              f"{host}'s {len(isns)} subflow ISNs are {', '.join(f'{v:#010x}' for v in values)}; "
                              f"the closest two are {tight} apart" + ("" if tight >= 2**16 else
                                                                      ", as a counter would make them"),
                              [s.syn if _sub_side(s, cs) == 0 else (s.synack or s.syn) for _, s in isns[:3]])


CAPTURE_RULES: tuple[tuple[tuple[str, ...], Callable[[list[Connection], list[Subflow]],
                                                      Iterable[tuple[int, Judgment]]]], ...] = (
    (("R3.1-21", "R3.1-22", "R3.1-23", "R3.1-24"), _hashing), (("R3.1-06", "R3.1-07"), _keys),
    (("R3-04",), _isns),
)
