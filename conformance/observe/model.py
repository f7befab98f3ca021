"""MPTCP connections rebuilt from packets alone (the passive checker's view of a capture).

Streaming: `ModelBuilder.feed()` takes one segment at a time and keeps per-connection and
per-subflow state and counters, not the packets, so memory does not grow with the capture.

Several captures of one topology see the same segments on several links. Each direction of a
subflow is read
from one vantage only: the capture that shows its first segment (SYN, SYN/ACK) earliest, that is
the one nearest its sender, where segments are in the order they were sent (links may reorder:
veth queues per CPU do); copies in other captures are skipped, so nothing is counted twice.
Captures are read merged in time order (rules.check), ties going to the capture given first.

Keys give tokens and IDSNs (RFC 8684 §3.1); a join is attached to the connection whose token its
SYN names (§3.2) and its HMACs are checked against the keys of that connection."""

from __future__ import annotations

import hashlib
import heapq
import ipaddress
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from conformance.wire import crypto
from conformance.wire.bulk import Packet, iter_pcap

SYN, ACK, RST, FIN, URG = 0x02, 0x10, 0x04, 0x01, 0x20
# A SYN seen again with the same ISN and MPTCP option bytes but other addresses or ports this soon
# after the first is the same SYN past a NAT (a 32-bit ISN repeating by chance within a second:
# about 2^-32; fixed ISNs of scripted tools differ in their options or come in other captures).
NAT_WINDOW = 1.0


class Where:
    """A frame of a capture: the evidence a verdict points to. `time` orders frames of different
    captures (a connection's subflows are often read from different links); equality is by
    capture and frame. A slotted class: one is made per segment read, a dataclass costs more."""

    __slots__ = ("frame", "pcap", "time")

    def __init__(self, pcap: str, frame: int, time: float = 0.0) -> None:
        self.pcap, self.frame, self.time = pcap, frame, time

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Where) and (self.pcap, self.frame) == (other.pcap, other.frame)

    def __hash__(self) -> int:
        return hash((self.pcap, self.frame))

    def __lt__(self, other: Where) -> bool:
        return (self.pcap, self.frame) < (other.pcap, other.frame)

    def __repr__(self) -> str:
        return f"Where(pcap={self.pcap!r}, frame={self.frame}, time={self.time})"

    def __str__(self) -> str:
        return f"{Path(self.pcap).name} frame {self.frame}"


Tuple4 = tuple[str, int, str, int]  # initiator address, port, responder address, port


@dataclass
class Subflow:
    tuple4: Tuple4
    initial: bool
    syn: Where
    synack: Where | None = None
    ack: Where | None = None  # the third ACK (with MP_CAPABLE or MP_JOIN)
    # MP_JOIN: what each side said and whether the HMACs verify with the connection's keys.
    token: int | None = None
    responder_side: int = 1  # which side of the connection (0 initiator, 1 listener) answered the SYN
    address_ids: tuple[int | None, int | None] = (None, None)
    backup: tuple[int | None, int | None] = (None, None)
    nonces: tuple[int | None, int | None] = (None, None)
    synack_hmac: int | None = None
    ack_hmac: bytes | None = None
    hmac_ok: tuple[bool | None, bool | None] = (None, None)  # SYN/ACK's, third ACK's
    segments: int = 0
    payload: list[int] = field(default_factory=lambda: [0, 0])  # bytes from initiator, responder
    mappings: list[int] = field(default_factory=lambda: [0, 0])  # DSS mappings per direction
    rst: Where | None = None
    rst_side: int | None = None  # which side of the subflow sent the first RST
    rst_reason: int | None = None
    rst_reason_where: Where | None = None
    fin_where: list[Where | None] = field(default_factory=lambda: [None, None])  # each side's first FIN
    # Per side of the subflow: ISN (from its SYN), Window Scale shift, highest sequence number
    # sent (end of payload), highest ACK sent, and how many segments re-sent old sequence space.
    isn: list[int | None] = field(default_factory=lambda: [None, None])
    wscale: list[int | None] = field(default_factory=lambda: [None, None])
    snd_max: list[int | None] = field(default_factory=lambda: [None, None])
    ack_max: list[int | None] = field(default_factory=lambda: [None, None])
    retransmissions: list[int] = field(default_factory=lambda: [0, 0])
    translated: list[Tuple4] = field(default_factory=list)  # the same subflow's tuples past a NAT
    first_time: float = 0.0
    last_time: float = 0.0
    first_mapping: tuple[Where, int, int] | None = None  # where, 64-bit DSN, data-level length
    # Per-rule state of the streaming rules, keyed by the rule object (cheaper than a global table).
    scratch: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def fin(self) -> tuple[bool, bool]:
        """Whether each side (the subflow's initiator, its responder) sent a FIN."""
        return self.fin_where[0] is not None, self.fin_where[1] is not None

    @property
    def established(self) -> bool:
        return self.synack is not None and self.ack is not None


@dataclass
class AddressEvent:
    where: Where
    from_initiator: bool
    kind: str  # ADD_ADDR, echo, REMOVE_ADDR, MP_PRIO
    address_id: int | None = None
    address: str | None = None
    port: int | None = None
    hmac_ok: bool | None = None  # ADD_ADDR only: verified with the sender's and receiver's keys


@dataclass
class Connection:
    syn: Where
    version: int | None = None
    keys: list[int | None] = field(default_factory=lambda: [None, None])  # initiator's, listener's
    flags: list[int | None] = field(default_factory=lambda: [None, None, None])  # SYN, SYN/ACK, ACK
    subflows: list[Subflow] = field(default_factory=list)
    events: list[AddressEvent] = field(default_factory=list)
    fastclose: list[tuple[Where, int, int]] = field(default_factory=list)  # where, sender side, key it carries
    # The lowest 64-bit DSN each side mapped (with where), and the length of the data its
    # MP_CAPABLE carried (mapped implicitly at IDSN+1), if it sent data that way.
    lowest_dsn: list[tuple[Where, int] | None] = field(default_factory=lambda: [None, None])
    mpc_data: list[int | None] = field(default_factory=lambda: [None, None])
    # Per MP_FAIL: where, its sender (connection side), the DSN it names, whether on a RST.
    mp_fail_at: list[tuple[Where, int, int, bool]] = field(default_factory=list)
    infinite_mapping: list[Where] = field(default_factory=list)
    data_fin: list[Where | None] = field(default_factory=lambda: [None, None])
    data_fin_dsn: list[int | None] = field(default_factory=lambda: [None, None])  # the DSN the DATA_FIN takes
    # The peer's Data ACK that covers each side's DATA_FIN.
    data_fin_acked: list[Where | None] = field(default_factory=lambda: [None, None])
    max_data_ack: list[int | None] = field(default_factory=lambda: [None, None])  # sent by initiator, listener
    # Highest 64-bit DSN each side has mapped (end of its mappings), for expanding 32-bit values.
    dsn_end: list[int | None] = field(default_factory=lambda: [None, None])
    fallback: str | None = None  # why the connection runs as plain TCP, if it does
    fallback_from: Where | None = None  # where it began to (None: from its handshake)
    # Per side: where that side started sending without any MPTCP option (its third ACK, or data on
    # the first subflow) and never sent one again: it fell back to plain TCP there (§3.1, §3.7).
    bare_tail: list[Where | None] = field(default_factory=lambda: [None, None])
    echoed_key: int | None = None  # the listener's key as the initiator's third ACK echoes it
    first_time: float = 0.0
    last_time: float = 0.0
    scratch: dict = field(default_factory=dict, repr=False, compare=False)  # see Subflow.scratch

    def token(self, side: int) -> int | None:
        key = self.keys[side]
        return None if key is None else _token(key, self.version)

    def idsn(self, side: int) -> int | None:
        key = self.keys[side]
        if key is None:
            return None
        memo = self.scratch.get(("idsn", side))
        if memo is None or memo[0] != key:  # rules ask for it on many segments: hash once per key
            memo = self.scratch[("idsn", side)] = (key, _idsn(key, self.version))
        return memo[1]

    @property
    def checksum(self) -> bool | None:
        """§3.1: DSS checksums are used if either side set flag A in the handshake."""
        a, b = self.flags[0], self.flags[1]
        if a is None and b is None:
            return None
        return bool((a or 0) & 0x80 or (b or 0) & 0x80)

    def expand_dsn(self, side: int, value: int, bits: int) -> int:
        """A DSN of `side` (or a Data ACK of its data) as 64 bits: 32-bit values are placed next to
        the highest DSN that side has mapped, or its IDSN (§3.3.1)."""
        if bits == 64:
            return value
        near = self.dsn_end[side]
        if near is None:
            near = self.idsn(side)
        if near is None:
            return value
        return expand32(near, value)

    def side_of(self, address: str) -> int | None:
        """The connection side (0 initiator, 1 listener) owning `address`, by its subflows."""
        for sub in self.subflows:
            initiator = 1 - sub.responder_side if not sub.initial else 0
            if sub.tuple4[0] == address:
                return initiator
            if sub.tuple4[2] == address:
                return 1 - initiator
        return None


def _token(key: int, version: int | None) -> int:
    """RFC 8684 hashes with SHA-256; RFC 6824 (MPTCP v0) with SHA-1, same bit positions."""
    if version == 0:
        return int.from_bytes(hashlib.sha1(key.to_bytes(8, "big")).digest()[:4], "big")
    return crypto.token(key)


def _idsn(key: int, version: int | None) -> int:
    if version == 0:
        return int.from_bytes(hashlib.sha1(key.to_bytes(8, "big")).digest()[-8:], "big")
    return crypto.idsn(key)


def expand32(near: int, low: int) -> int:
    """The 64-bit number closest to `near` whose low 32 bits are `low`."""
    candidate = (near & ~0xFFFFFFFF) | low
    if candidate - near > 2**31:
        candidate -= 2**32
    elif near - candidate > 2**31:
        candidate += 2**32
    return candidate % 2**64


def seq_after(a: int, b: int) -> bool:
    """a > b in 32-bit sequence space (RFC 1982 arithmetic)."""
    return a != b and (a - b) % 2**32 < 2**31


# Called for every MPTCP option of every segment the model reads (once per segment, from its
# vantage): (connection or None for an unmatched join, subflow, where, packet, option class, fields).
OptionObserver = Callable[["Connection | None", Subflow, Where, Packet, str, dict], None]
# Called once per segment after the model has taken its options in: (connection, subflow, where,
# packet, side of the subflow that sent it, side of the connection that sent it).
SegmentObserver = Callable[[Connection, Subflow, Where, Packet, int, int], None]


class ModelBuilder:
    """Feed segments (capture by capture); read `connections` at the end. Observers see every
    option as it streams past (the passive rules use this: nothing is kept per packet)."""

    def __init__(self, observers: Iterable[OptionObserver] = (),
                 segment_observers: Iterable[SegmentObserver] = ()) -> None:
        self.observers = list(observers)
        self.segment_observers = list(segment_observers)
        self.connections: list[Connection] = []
        self.orphans: list[Subflow] = []  # joins whose token names no connection of the capture
        # (src, sport, dst, dport) of each direction -> connection, subflow, [vantage of each side], side
        self._subflows: dict[tuple, tuple[Connection | None, Subflow, list, int]] = {}
        self._by_token: dict[int, tuple[Connection, int]] = {}
        # The initiator's ISN of each subflow, to recognise one seen again behind an address translator.
        self._by_isn: dict[int, tuple[Subflow, float, tuple]] = {}

    def finish(self) -> list[Connection]:
        """The connections, once every capture is read: a side whose last segments speak no MPTCP
        (from its third ACK, or from a data segment on) fell back to plain TCP there."""
        for conn in self.connections:
            tails = [(tail.time, side, tail) for side, tail in enumerate(conn.bare_tail) if tail is not None]
            if conn.fallback is None and tails:
                _, side, tail = min(tails)  # the connection runs as plain TCP from the first of them
                conn.fallback = f"the {('initiator', 'listener')[side]} sends no MPTCP option from {tail} on"
                conn.fallback_from = tail
        return self.connections

    def feed(self, pcap: str, p: Packet) -> None:
        known = self._subflows.get((p.src, p.sport, p.dst, p.dport))  # keyed by direction: no side to work out
        if known is None:
            if (p.flags & (SYN | ACK) == SYN and (p.dst, p.dport, p.src, p.sport) not in self._subflows
                    and not self._translated(p)):
                self._open(Where(pcap, p.frame, p.time), p)
            return
        conn, sub, vantages, side = known
        if vantages[side] is None:
            vantages[side] = pcap
        elif vantages[side] != pcap:
            return  # the same segment seen on another link: each direction is read from one vantage
        self._segment(conn, sub, Where(pcap, p.frame, p.time), p, side)

    def _remember(self, conn: Connection | None, sub: Subflow, pcap: str) -> None:
        vantages = [pcap, None]
        a, ap, b, bp = sub.tuple4
        self._subflows[(a, ap, b, bp)] = (conn, sub, vantages, 0)
        self._subflows[(b, bp, a, ap)] = (conn, sub, vantages, 1)

    def _translated(self, p: Packet) -> bool:
        """A SYN of a subflow already seen under other addresses or ports (a NAT between two
        captures rewrote them, not the ISN) is that subflow: both tuples lead to it, each direction
        still read from the first capture that showed it, which is the one nearest its sender."""
        seen = self._by_isn.get(p.seq)
        if seen is None or p.time - seen[1] > NAT_WINDOW or tuple(p.raw_options) != seen[2]:
            return False
        sub = seen[0]
        a, ap, b, bp = sub.tuple4
        if (p.src, p.sport, p.dst, p.dport) == (a, ap, b, bp):
            return False
        first = self._subflows[(a, ap, b, bp)]
        self._subflows[(p.src, p.sport, p.dst, p.dport)] = first
        self._subflows[(p.dst, p.dport, p.src, p.sport)] = self._subflows[(b, bp, a, ap)]
        sub.translated.append((p.src, p.sport, p.dst, p.dport))
        return True

    def _open(self, where: Where, p: Packet) -> None:
        tuple4 = (p.src, p.sport, p.dst, p.dport)
        opts = p.options
        mpc = next((f for n, f in opts if n == "MPCapable"), None)
        join = next((f for n, f in opts if n == "MPJoinSyn"), None)
        if join is not None:
            sub = Subflow(tuple4, initial=False, syn=where, token=join["receiver_token"],
                          address_ids=(join["address_id"], None), backup=(join["backup"], None),
                          nonces=(join["sender_random"], None))
            found = self._by_token.get(join["receiver_token"])
            conn = found[0] if found else None
            if conn is not None:
                sub.responder_side = found[1]
                conn.subflows.append(sub)
            else:
                self.orphans.append(sub)
            self._remember(conn, sub, where.pcap)
        else:
            conn = Connection(syn=where)
            if mpc is not None:
                conn.version, conn.flags[0] = mpc["version"], mpc["flags"]
                if mpc.get("sender_key") is not None:  # v0 SYN
                    conn.keys[0] = mpc["sender_key"]
            else:
                conn.fallback = "the SYN carries no MP_CAPABLE"
            sub = Subflow(tuple4, initial=True, syn=where)
            conn.first_time = p.time
            conn.subflows.append(sub)
            self.connections.append(conn)
            self._remember(conn, sub, where.pcap)
        self._by_isn[p.seq] = (sub, p.time, tuple(p.raw_options))
        self._segment(conn, sub, where, p, 0, opening=True)

    def _segment(self, conn: Connection | None, sub: Subflow, where: Where, p: Packet, side: int,
                 opening: bool = False) -> None:
        sub.segments += 1
        sub.payload[side] += p.payload_len
        if sub.segments == 1:
            sub.first_time = p.time
        sub.last_time = p.time
        if conn is not None and p.time > conn.last_time:
            conn.last_time = p.time
        flags = p.flags
        if flags & SYN and sub.isn[side] is None:
            sub.isn[side] = p.seq
            sub.wscale[side] = p.wscale
        end = (p.seq + p.payload_len + (1 if flags & (SYN | FIN) else 0)) % 2**32
        high = sub.snd_max[side]
        if high is None or seq_after(end, high):
            sub.snd_max[side] = end
        elif p.payload_len and seq_after(high, p.seq):
            sub.retransmissions[side] += 1
        if flags & ACK and (sub.ack_max[side] is None or seq_after(p.ack, sub.ack_max[side])):
            sub.ack_max[side] = p.ack
        if flags & RST and sub.rst is None:
            sub.rst, sub.rst_side = where, side
        if flags & FIN:
            sub.fin_where[side] = sub.fin_where[side] or where
        for name, f in p.options:
            for observe in self.observers:
                observe(conn, sub, where, p, name, f)
            if conn is None:
                continue
            if name == "MPCapable" and sub.initial:
                self._mp_capable(conn, sub, where, p, side, f)
            elif name == "MPJoinSynAck" and not sub.initial and side == 1:
                self._join_synack(conn, sub, where, f)
            elif name == "MPJoinAck" and not sub.initial and side == 0:
                self._join_ack(conn, sub, where, f)
            elif name == "DSS":
                self._dss(conn, sub, where, side, f)
            elif name == "AddAddr":
                self._add_addr(conn, sub, where, p, side, f)
            elif name == "RemoveAddr":
                conn.events.append(AddressEvent(where, self._conn_side(sub, side) == 0, "REMOVE_ADDR",
                                                address_id=f["address_ids"][0] if f["address_ids"] else None))
            elif name == "MPPrio":
                conn.events.append(AddressEvent(where, self._conn_side(sub, side) == 0, "MP_PRIO"))
            elif name == "MPFastclose":
                conn.fastclose.append((where, self._conn_side(sub, side), f["receiver_key"]))
            elif name == "MPFail":
                conn.mp_fail_at.append((where, self._conn_side(sub, side), f["dsn"], bool(flags & RST)))
            elif name == "MPTCPRst" and sub.rst_reason is None:
                sub.rst_reason, sub.rst_reason_where = f["reason"], where
        if conn is not None and sub.initial and not flags & (SYN | RST):
            if p.options:
                conn.bare_tail[side] = None
            elif conn.bare_tail[side] is None and (p.payload_len or (side == 0 and sub.ack is None)):
                conn.bare_tail[side] = where
        if conn is not None:
            conn_side = self._conn_side(sub, side)
            for observe in self.segment_observers:
                observe(conn, sub, where, p, side, conn_side)
        if (not opening and sub.initial and conn is not None and p.flags & (SYN | ACK) == SYN | ACK
                and conn.fallback is None and not any(n == "MPCapable" for n, _ in p.options)):
            conn.fallback = "the SYN/ACK carries no MP_CAPABLE"

    def _mp_capable(self, conn: Connection, sub: Subflow, where: Where, p: Packet, side: int, f: dict) -> None:
        if p.flags & (SYN | ACK) == SYN | ACK:
            sub.synack = sub.synack or where
            conn.flags[1] = f["flags"]
            if f.get("sender_key") is not None:
                conn.keys[1] = f["sender_key"]
                self._by_token[_token(f["sender_key"], conn.version)] = (conn, 1)
        elif side == 0 and f.get("receiver_key") is not None:
            if f.get("data_level_length") and conn.mpc_data[0] is None:
                conn.mpc_data[0] = f["data_level_length"]
                if conn.dsn_end[0] is None:  # the data is mapped implicitly at IDSN+1 (§3.1)
                    conn.dsn_end[0] = (_idsn(f["sender_key"], conn.version) + 1 + f["data_level_length"]) % 2**64
            if sub.ack is None:
                sub.ack = where
                conn.flags[2] = f["flags"]
                conn.echoed_key = f["receiver_key"]
            if conn.keys[0] is None and f.get("sender_key") is not None:
                conn.keys[0] = f["sender_key"]
                self._by_token[_token(f["sender_key"], conn.version)] = (conn, 0)

    def _join_synack(self, conn: Connection, sub: Subflow, where: Where, f: dict) -> None:
        sub.synack = sub.synack or where
        sub.address_ids = (sub.address_ids[0], f["address_id"])
        sub.backup = (sub.backup[0], f["backup"])
        sub.nonces = (sub.nonces[0], f["sender_random"])
        sub.synack_hmac = f["sender_truncated_hmac"]
        responder, initiator = self._join_keys(conn, sub)
        if None not in (responder, initiator, *sub.nonces):
            ok = crypto.verify_join_synack(sub.synack_hmac, responder, initiator, sub.nonces[1], sub.nonces[0])
            sub.hmac_ok = (ok, sub.hmac_ok[1])

    def _join_ack(self, conn: Connection, sub: Subflow, where: Where, f: dict) -> None:
        sub.ack = sub.ack or where
        sub.ack_hmac = f["sender_hmac"]
        responder, initiator = self._join_keys(conn, sub)
        if None not in (responder, initiator, *sub.nonces):
            ok = crypto.verify_join_ack(sub.ack_hmac, initiator, responder, sub.nonces[0], sub.nonces[1])
            sub.hmac_ok = (sub.hmac_ok[0], ok)

    def _join_keys(self, conn: Connection, sub: Subflow) -> tuple[int | None, int | None]:
        """(responder's key, initiator's key) of a join: the token names the responder."""
        found = self._by_token.get(sub.token) if sub.token is not None else None
        if found is None:
            return None, None
        _, side = found
        return conn.keys[side], conn.keys[1 - side]

    def _dss(self, conn: Connection, sub: Subflow, where: Where, side: int, f: dict) -> None:
        flags = f["flags"]
        conn_side = self._conn_side(sub, side)
        if flags & 0x04:
            sub.mappings[side] += 1
            length = f.get("data_level_length")
            dsn = conn.expand_dsn(conn_side, f["dsn"], 64 if flags & 0x08 else 32)
            low = conn.lowest_dsn[conn_side]
            if flags & 0x08 and length and (low is None or f["dsn"] < low[1]):
                conn.lowest_dsn[conn_side] = (where, f["dsn"])
            if sub.first_mapping is None:
                sub.first_mapping = (where, dsn, length or 0)
            if length == 0:
                conn.infinite_mapping.append(where)
            elif length:
                end = (dsn + length) % 2**64
                if conn.dsn_end[conn_side] is None or 0 < (end - conn.dsn_end[conn_side]) % 2**64 < 2**63:
                    conn.dsn_end[conn_side] = end
                if flags & 0x10:  # the DATA_FIN takes the last DSN of its mapping (§3.3.3)
                    conn.data_fin_dsn[conn_side] = (end - 1) % 2**64
        if flags & 0x10 and conn.data_fin[conn_side] is None:
            conn.data_fin[conn_side] = where
        if flags & 0x01:
            peer = 1 - conn_side
            ack = conn.expand_dsn(peer, f["data_ack"], 64 if flags & 0x02 else 32)
            best = conn.max_data_ack[conn_side]
            if best is None or 0 < (ack - best) % 2**64 < 2**63:
                conn.max_data_ack[conn_side] = ack
            fin = conn.data_fin_dsn[peer]
            if fin is not None and conn.data_fin_acked[peer] is None and 0 < (ack - fin) % 2**64 < 2**63:
                conn.data_fin_acked[peer] = where

    @staticmethod
    def _conn_side(sub: Subflow, side: int) -> int:
        """0 if this segment's sender is the connection's initiator, else 1 (`side` is its side
        of the subflow: 0 for the subflow's initiator)."""
        if sub.initial:
            return side
        return 1 - sub.responder_side if side == 0 else sub.responder_side

    def _add_addr(self, conn: Connection, sub: Subflow, where: Where, p: Packet, side: int, f: dict) -> None:
        sender = self._conn_side(sub, side)
        echo = bool(f["echo"])
        event = AddressEvent(where, sender == 0, "echo" if echo else "ADD_ADDR", address_id=f["address_id"],
                             address=f["address"], port=f.get("port"))
        if not echo and None not in conn.keys and f.get("truncated_hmac") is not None:
            event.hmac_ok = crypto.verify_add_addr(f["truncated_hmac"], conn.keys[sender], conn.keys[1 - sender],
                                                   f["address_id"], ipaddress.ip_address(f["address"]).packed,
                                                   f.get("port"))
        conn.events.append(event)


def merged_packets(pcaps: Iterable[Path | str]) -> Iterator[tuple[str, Packet]]:
    """Every capture's packets in time order (ties: the order the captures were given), streamed:
    a connection's subflows are often seen on different links, and what one link saw must be read
    interleaved with what another saw (the captures of one machine share its clock)."""
    names = [str(c) for c in pcaps]

    def tagged(index: int, pcap: str) -> Iterator[tuple[float, int, str, Packet]]:
        for p in iter_pcap(pcap):
            yield p.time, index, pcap, p

    if len(names) == 1:
        for p in iter_pcap(names[0]):
            yield names[0], p
        return
    for _, _, pcap, p in heapq.merge(*(tagged(i, c) for i, c in enumerate(names)), key=lambda t: t[:2]):
        yield pcap, p


def build(pcaps: Iterable[Path | str], observers: Iterable[OptionObserver] = (),
          segment_observers: Iterable[SegmentObserver] = ()) -> list[Connection]:
    """The MPTCP (and fallen-back) connections in these captures of one topology, in SYN order."""
    builder = ModelBuilder(observers, segment_observers)
    for pcap, p in merged_packets(pcaps):
        builder.feed(pcap, p)
    return builder.finish()
