"""MPTCP connections rebuilt from packets alone (the passive checker's view of a capture).

Streaming: `ModelBuilder.feed()` takes one segment at a time and keeps per-connection and
per-subflow state and counters, not the packets, so memory does not grow with the capture.

Several captures of one topology see the same segments on several links. Each subflow is read
from one vantage only: the first capture (in the order given) that shows its SYN; its segments
in other captures are skipped, so nothing is counted twice.

Keys give tokens and IDSNs (RFC 8684 §3.1); a join is attached to the connection whose token its
SYN names (§3.2) and its HMACs are checked against the keys of that connection."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from conformance.wire import crypto
from conformance.wire.bulk import Packet, iter_pcap

SYN, ACK, RST, FIN = 0x02, 0x10, 0x04, 0x01


@dataclass(frozen=True)
class Where:
    """A frame of a capture: the evidence a verdict points to."""

    pcap: str
    frame: int

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
    rst_reason: int | None = None
    fin: list[bool] = field(default_factory=lambda: [False, False])

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
    mp_fail: list[Where] = field(default_factory=list)
    infinite_mapping: list[Where] = field(default_factory=list)
    data_fin: list[Where | None] = field(default_factory=lambda: [None, None])
    max_data_ack: list[int | None] = field(default_factory=lambda: [None, None])  # sent by initiator, listener
    fallback: str | None = None  # why the connection runs as plain TCP, if it does

    def token(self, side: int) -> int | None:
        key = self.keys[side]
        return None if key is None else crypto.token(key)

    def idsn(self, side: int) -> int | None:
        key = self.keys[side]
        return None if key is None else crypto.idsn(key)

    @property
    def checksum(self) -> bool | None:
        """§3.1: DSS checksums are used if either side set flag A in the handshake."""
        known = [f for f in self.flags[:2] if f is not None]
        return None if not known else any(f & 0x80 for f in known)


# Called for every MPTCP option of every segment the model reads (once per segment, from its
# vantage): (connection or None for an unmatched join, subflow, where, packet, option class, fields).
OptionObserver = Callable[["Connection | None", Subflow, Where, Packet, str, dict], None]


class ModelBuilder:
    """Feed segments (capture by capture); read `connections` at the end. Observers see every
    option as it streams past (the passive rules use this: nothing is kept per packet)."""

    def __init__(self, observers: Iterable[OptionObserver] = ()) -> None:
        self.observers = list(observers)
        self.connections: list[Connection] = []
        self._subflows: dict[frozenset, tuple[Connection | None, Subflow, str]] = {}
        self._by_token: dict[int, tuple[Connection, int]] = {}

    def feed(self, pcap: str, p: Packet) -> None:
        ends = frozenset(((p.src, p.sport), (p.dst, p.dport)))
        known = self._subflows.get(ends)
        where = Where(pcap, p.frame)
        if known is None:
            if p.flags & (SYN | ACK) == SYN:
                self._open(ends, where, p)
            return
        conn, sub, vantage = known
        if vantage != pcap:
            return  # the same subflow seen on another link: read from one vantage only
        self._segment(conn, sub, where, p)

    def _open(self, ends: frozenset, where: Where, p: Packet) -> None:
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
            self._subflows[ends] = (conn, sub, where.pcap)
        else:
            conn = Connection(syn=where)
            if mpc is not None:
                conn.version, conn.flags[0] = mpc["version"], mpc["flags"]
                if mpc.get("sender_key") is not None:  # v0 SYN
                    conn.keys[0] = mpc["sender_key"]
            else:
                conn.fallback = "the SYN carries no MP_CAPABLE"
            sub = Subflow(tuple4, initial=True, syn=where)
            conn.subflows.append(sub)
            self.connections.append(conn)
            self._subflows[ends] = (conn, sub, where.pcap)
        self._segment(conn, sub, where, p, opening=True)

    def _segment(self, conn: Connection | None, sub: Subflow, where: Where, p: Packet,
                 opening: bool = False) -> None:
        sub.segments += 1
        side = 0 if (p.src, p.sport) == sub.tuple4[:2] else 1
        sub.payload[side] += p.payload_len
        if p.flags & RST:
            sub.rst = sub.rst or where
        if p.flags & FIN:
            sub.fin[side] = True
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
                conn.mp_fail.append(where)
            elif name == "MPTCPRst":
                sub.rst_reason = f["reason"]
        if (not opening and sub.initial and conn is not None and p.flags & (SYN | ACK) == SYN | ACK
                and conn.fallback is None and not any(n == "MPCapable" for n, _ in p.options)):
            conn.fallback = "the SYN/ACK carries no MP_CAPABLE"

    def _mp_capable(self, conn: Connection, sub: Subflow, where: Where, p: Packet, side: int, f: dict) -> None:
        if p.flags & (SYN | ACK) == SYN | ACK:
            sub.synack = sub.synack or where
            conn.flags[1] = f["flags"]
            if f.get("sender_key") is not None:
                conn.keys[1] = f["sender_key"]
                self._by_token[crypto.token(f["sender_key"])] = (conn, 1)
        elif side == 0 and f.get("receiver_key") is not None:
            if f.get("data_level_length") and conn.mpc_data[0] is None:
                conn.mpc_data[0] = f["data_level_length"]
            if sub.ack is None:
                sub.ack = where
                conn.flags[2] = f["flags"]
            if conn.keys[0] is None and f.get("sender_key") is not None:
                conn.keys[0] = f["sender_key"]
                self._by_token[crypto.token(f["sender_key"])] = (conn, 0)

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
            low = conn.lowest_dsn[conn_side]
            if flags & 0x08 and f.get("data_level_length") and (low is None or f["dsn"] < low[1]):
                conn.lowest_dsn[conn_side] = (where, f["dsn"])
            if f.get("data_level_length") == 0:
                conn.infinite_mapping.append(where)
        if flags & 0x10 and conn.data_fin[conn_side] is None:
            conn.data_fin[conn_side] = where
        # Only 64-bit Data ACKs: a 32-bit one cannot be placed in sequence space without the
        # peer's DSN history (§3.3.1), which later rules reconstruct.
        if flags & 0x03 == 0x03:
            best = conn.max_data_ack[conn_side]
            if best is None or f["data_ack"] > best:
                conn.max_data_ack[conn_side] = f["data_ack"]

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


def build(pcaps: Iterable[Path | str], observers: Iterable[OptionObserver] = ()) -> list[Connection]:
    """The MPTCP (and fallen-back) connections in these captures of one topology, in SYN order."""
    builder = ModelBuilder(observers)
    for pcap in pcaps:
        for p in iter_pcap(pcap):
            builder.feed(str(pcap), p)
    return builder.connections
