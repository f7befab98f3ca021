"""Passive rules that follow each subflow's segments in order: data-sequence mappings, Data ACKs,
the connection-level window, and duplicate ACKs sent for MPTCP signalling.

Each rule object is a segment observer of conformance.observe.model.ModelBuilder: it is called once
per segment (after the model has read its options) and keeps a bounded state per subflow direction
and a Tally per connection and requirement, never the packets, so a capture of any length is
judged in flat memory. `judge(conn)` gives the verdicts at the end.

Captures are read merged in time order (see rules.check), so a Data ACK seen on one subflow comes
after the data it acknowledges even when that data went over another link."""

from __future__ import annotations

from bisect import bisect_right, insort
from collections.abc import Iterable
from typing import ClassVar

from conformance.observe.judgment import FAIL, PASS, Judgment, Tally
from conformance.observe.model import ACK, FIN, RST, SYN, URG, Connection, Subflow, Where, expand32, seq_after
from conformance.wire.bulk import Packet

DSS_A, DSS_A8, DSS_M, DSS_M8, DSS_F = 0x01, 0x02, 0x04, 0x08, 0x10
MSL = 120.0  # RFC 793's maximum segment lifetime, seconds
WRAP_RATE = 2**32 / MSL  # bytes/s at which a 32-bit DSN wraps within one MSL (§3.3.1)
RATE_WINDOW = 1.0  # a rate is only taken over at least this many seconds of mapped data
_MAPPINGS_KEPT = 2048  # per subflow direction; older mappings cannot be retransmitted any more


def _dss(p: Packet) -> dict | None:
    for name, f in p.options:
        if name == "DSS":
            return f
    return None


def _names(p: Packet) -> str:
    return ", ".join(n for n, _ in p.options) or "no MPTCP option"


def _ahead(a: int, b: int) -> bool:
    """a > b in 64-bit data sequence space."""
    return 0 < (a - b) % 2**64 < 2**63


class StreamRules:
    """Base: a Tally per (connection, requirement) and the sentence each requirement judges by."""

    WANTS: ClassVar[dict[str, tuple[str, str]]] = {}  # rid -> (what it wants, what is counted)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(self.WANTS)

    def tally(self, conn: Connection, rid: str) -> Tally:
        mine = conn.scratch.get(self)
        if mine is None:
            mine = conn.scratch[self] = {}
        t = mine.get(rid)
        if t is None:
            t = mine[rid] = Tally()
        return t

    def judge(self, conn: Connection) -> Iterable[Judgment]:
        for rid, (wants, unit) in self.WANTS.items():
            t = conn.scratch.get(self, {}).get(rid)
            if t is not None:
                yield t.judgment(rid, wants, unit)


class _Maps:
    """The mappings one subflow direction declared: start SSN -> (end SSN, DSN - SSN), 64-bit."""

    __slots__ = ("by_start", "hint", "starts")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.by_start: dict[int, tuple[int, int]] = {}
        self.hint: int | None = None

    def unwrap(self, ssn: int) -> int:
        value = ssn if self.hint is None else expand32(self.hint, ssn)
        self.hint = value
        return value

    def conflict(self, start: int, end: int, offset: int) -> tuple[int, int, int] | None:
        """An earlier mapping overlapping [start, end) with another DSN - SSN offset."""
        i = bisect_right(self.starts, start) - 1
        for j in range(max(i - 1, 0), len(self.starts)):
            s = self.starts[j]
            if s >= end:
                break
            e, off = self.by_start[s]
            if e > start and off != offset:
                return s, e, off
        return None

    def add(self, start: int, end: int, offset: int) -> None:
        known = self.by_start.get(start)
        if known is None:
            insort(self.starts, start)
            if len(self.starts) > _MAPPINGS_KEPT:
                for s in self.starts[:_MAPPINGS_KEPT // 2]:
                    del self.by_start[s]
                del self.starts[:_MAPPINGS_KEPT // 2]
            self.by_start[start] = (end, offset)
        elif known[1] == offset and end > known[0]:
            self.by_start[start] = (end, offset)

    def covering(self, ssn: int) -> tuple[int, int] | None:
        i = bisect_right(self.starts, ssn) - 1
        if i < 0:
            return None
        s = self.starts[i]
        e = self.by_start[s][0]
        return (s, e) if ssn < e else None


class _ConnMaps:
    __slots__ = ("acked", "bare", "bare_first", "bytes", "conn", "first_data_done", "listener_dss", "n32", "n64",
                 "span")

    def __init__(self) -> None:
        self.conn: Connection | None = None
        # Data with no MPTCP option at all is a fallback if the sender never speaks MPTCP again
        # (§3.7), a violation if it does: judged when it does, left unjudged at the end otherwise.
        self.bare: list[list | None] = [None, None]  # per side: [first where, count]
        self.bare_first: Where | None = None  # the initiator's first data, bare
        self.acked = [False, False]  # has the peer Data-ACKed any of this side's data yet (§3.7)
        self.first_data_done = False
        self.listener_dss = False
        self.bytes = [0, 0]
        self.span: list[list[float] | None] = [None, None]  # first and last time a mapping was sent
        self.n32 = [0, 0]
        self.n64 = [0, 0]


class MappingRules(StreamRules):
    WANTS: ClassVar[dict[str, tuple[str, str]]] = {
        "R3.3.1-01": ("a declared mapping is never changed: overlapping mappings of a subflow agree on DSN - SSN",
                      "mappings"),
        "R3.3.1-16": ("a DSS mapping covers part of the subflow sequence space of the segment carrying it",
                      "mappings on data segments"),
        "R3.3.1-05": ("the urgent pointer never points into the middle of a data mapping", "urgent segments"),
        "R3.7-02": ("on the first subflow, every data segment carries a mapping until some data is Data-ACKed",
                    "data segments before the first Data ACK"),
        "R3.1-L01": ("the initiator's first data segment, sent before it can know its third ACK arrived, repeats "
                     "MP_CAPABLE with both keys and the data-level length", "first data segments"),
    }
    EXTRA: ClassVar[tuple[str, ...]] = ("R3.3.1-11", "R3.3.1-13")

    def __init__(self) -> None:
        self.conns: dict[int, _ConnMaps] = {}

    @property
    def ids(self) -> tuple[str, ...]:
        return (*self.WANTS, *self.EXTRA)

    def __call__(self, conn: Connection, sub: Subflow, where: Where, p: Packet, side: int, cs: int) -> None:
        if conn.fallback is not None or p.flags & SYN:
            return
        st = self.conns.get(id(conn))
        if st is None:
            st = self.conns[id(conn)] = _ConnMaps()
            st.conn = conn  # keeps id(conn) from being reused while the state lives
        dss = mpc = None
        for name, f in p.options:
            if name == "DSS":
                dss = f
            elif name == "MPCapable":
                mpc = f
        mapped = dss is not None and dss["flags"] & DSS_M
        if sub.initial:
            self._initial(conn, st, where, p, cs, dss, mpc, mapped)
        both = sub.scratch.get(self)
        if both is None:
            both = sub.scratch[self] = (_Maps(), _Maps())
        maps = both[side]
        isn = sub.isn[side]
        if mapped and dss.get("data_level_length"):
            self._mapping(conn, st, maps, where, p, isn, cs, dss)
        if p.flags & URG and p.payload_len and isn is not None and maps.hint is not None:
            pos = expand32(maps.hint, (p.seq - isn + p.urgent) % 2**32)
            inside = maps.covering(pos)
            t = self.tally(conn, "R3.3.1-05")
            if inside and inside[0] < pos:
                t.bad(where, f"urgent pointer at SSN {pos} inside the mapping of SSN {inside[0]}..{inside[1]}")
            else:
                t.ok(where)

    def _initial(self, conn: Connection, st: _ConnMaps, where: Where, p: Packet, cs: int, dss, mpc,
                 mapped) -> None:
        if cs == 1 and not st.listener_dss and any(n != "MPCapable" for n, _ in p.options):
            # Any other MPTCP option from the listener (a DSS, an ADD_ADDR whose HMAC needs the
            # initiator's key) tells the initiator its third ACK arrived (§3.1).
            st.listener_dss = True
        if p.options:
            self._spoke_again(conn, st, cs)
        if not p.payload_len:
            return
        if cs == 0 and not st.first_data_done:
            st.first_data_done = True
            if not st.listener_dss:  # else the initiator may know its third ACK arrived
                t = self.tally(conn, "R3.1-L01")
                if not p.options:
                    st.bare_first = where
                elif mpc and mpc.get("receiver_key") is not None and mpc.get("data_level_length"):
                    if mpc["receiver_key"] == conn.keys[1]:
                        t.ok(where)
                    else:
                        t.bad(where, f"its MP_CAPABLE echoes key {mpc['receiver_key']:#x}; the listener's is "
                                     f"{conn.keys[1]:#x}")
                else:
                    t.bad(where, f"a {p.payload_len}-byte segment with {_names(p)}")
        if not st.acked[cs]:
            idsn, peer_ack = conn.idsn(cs), conn.max_data_ack[1 - cs]
            if idsn is not None and peer_ack is not None and _ahead(peer_ack, (idsn + 1) % 2**64):
                st.acked[cs] = True
            else:
                t = self.tally(conn, "R3.7-02")
                if mapped or (mpc and mpc.get("data_level_length")):
                    t.ok(where)
                elif not p.options:
                    if st.bare[cs] is None:
                        st.bare[cs] = [where, 0]
                    st.bare[cs][1] += 1
                else:
                    t.bad(where, f"a {p.payload_len}-byte segment with {_names(p)} and no mapping")

    def _spoke_again(self, conn: Connection, st: _ConnMaps, cs: int) -> None:
        """MPTCP options after data without any: that data was a violation, not a fallback."""
        bare = st.bare[cs]
        if bare is not None:
            self.tally(conn, "R3.7-02").bad(bare[0], f"{bare[1]} data segment(s) with no MPTCP option at all, "
                                                     "yet the sender speaks MPTCP again afterwards")
            st.bare[cs] = None
        if cs == 0 and st.bare_first is not None:
            self.tally(conn, "R3.1-L01").bad(st.bare_first, "a data segment with no MPTCP option at all, yet the "
                                                            "initiator speaks MPTCP again afterwards")
            st.bare_first = None

    def _mapping(self, conn: Connection, st: _ConnMaps, maps: _Maps, where: Where, p: Packet, isn: int | None,
                 cs: int, dss: dict) -> None:
        length, flags = dss["data_level_length"], dss["flags"]
        if dss["ssn"] == 0 and flags & DSS_F and not p.payload_len:
            return  # the payload-less DATA_FIN's mapping (§3.3.3), judged elsewhere
        wide = bool(flags & DSS_M8)
        if wide:
            st.n64[cs] += 1
        else:
            st.n32[cs] += 1
        st.bytes[cs] += length
        span = st.span[cs]
        if span is None:
            st.span[cs] = [p.time, p.time]
        else:
            span[1] = p.time
        ssn = maps.unwrap(dss["ssn"])
        dsn = conn.expand_dsn(cs, dss["dsn"], 64 if wide else 32)
        # A DATA_FIN takes a data sequence number but no subflow sequence space (§3.3.3).
        end = ssn + length - (1 if flags & DSS_F else 0)
        if p.payload_len and isn is not None:
            rel = expand32(ssn, (p.seq - isn) % 2**32)
            t = self.tally(conn, "R3.3.1-16")
            if rel < end and ssn < rel + p.payload_len:
                t.ok(where)
            else:
                t.bad(where, f"mapping SSN {ssn}..{end} on a segment holding SSN {rel}..{rel + p.payload_len}")
        offset = (dsn - ssn) % 2**64
        clash = maps.conflict(ssn, end, offset)
        t = self.tally(conn, "R3.3.1-01")
        if clash:
            s, e, off = clash
            t.bad(where, f"SSN {ssn}..{end} mapped to DSN {dsn:#x}; SSN {s}..{e} was mapped to DSN "
                         f"{(s + off) % 2**64:#x}")
        else:
            t.ok(where)
            maps.add(ssn, end, offset)

    def judge(self, conn: Connection) -> Iterable[Judgment]:
        yield from super().judge(conn)
        st = self.conns.get(id(conn))
        if st is None:
            return
        for cs, who in ((0, "initiator"), (1, "listener")):
            n32, n64, span = st.n32[cs], st.n64[cs], st.span[cs]
            if not n32 + n64 or span is None:
                continue
            seconds = span[1] - span[0]
            rate = st.bytes[cs] / seconds if seconds >= RATE_WINDOW else None
            shown = f"{rate / 1e6:.1f} MB/s" if rate is not None else f"{st.bytes[cs]} bytes in {seconds:.3f} s"
            if not n32:
                yield Judgment("R3.3.1-13", PASS, f"all {n64} mappings of the {who} carry 64-bit DSNs ({shown}), "
                               "which holds at any rate")
                continue
            yield Judgment("R3.3.1-11", PASS, f"the {who} sends {n32} of {n32 + n64} mappings with 32-bit DSNs "
                           f"({shown}); a 32-bit DSN wraps within the MSL above {WRAP_RATE / 1e6:.1f} MB/s")
            if rate is not None and rate >= WRAP_RATE:
                yield Judgment("R3.3.1-13", FAIL, f"the {who} maps {shown}, fast enough for a 32-bit DSN to wrap "
                               f"within the MSL (>= {WRAP_RATE / 1e6:.1f} MB/s), yet sends {n32} mappings with "
                               "32-bit DSNs; wants 64-bit DSNs")


class _Dup:
    __slots__ = ("data_ack", "key", "run_any", "run_signal")

    def __init__(self) -> None:
        self.key: tuple[int, int, int] | None = None
        self.data_ack: int | None = None
        self.run_any = self.run_signal = 0


class DuplicateAckRules(StreamRules):
    """§3 and §3.4.1: at most two duplicate ACKs in a row sent only to carry MPTCP options. A
    duplicate ACK: no payload, no SYN/FIN/RST, same sequence number, ACK and window as the
    previous segment of that direction. It is sent for MPTCP alone if it carries an option other
    than DSS (a signal), or a DSS whose Data ACK moved (R3-02 counts both, the others signals)."""

    RIDS: ClassVar[dict[str, str]] = {
        "R3-02": "MPTCP options", "R3.4.1-18": "MPTCP signalling (ADD_ADDR, REMOVE_ADDR, MP_PRIO ...)",
            "R4-03": "non-DSS MPTCP signals"}

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(self.RIDS)

    def __call__(self, conn: Connection, sub: Subflow, where: Where, p: Packet, side: int, cs: int) -> None:
        both = sub.scratch.get(self)
        if both is None:
            both = sub.scratch[self] = (_Dup(), _Dup())
        st = both[side]
        flags = p.flags
        if p.payload_len or flags & (SYN | FIN | RST) or not flags & ACK:
            st.key, st.run_any, st.run_signal = None, 0, 0
            return
        key = (p.seq, p.ack, p.window)
        signal = False
        data_ack = None
        for name, f in p.options:
            if name == "DSS":
                if f["flags"] & DSS_A:
                    data_ack = f.get("data_ack")
            else:
                signal = True
        moved = data_ack is not None and st.data_ack is not None and data_ack != st.data_ack
        if key == st.key and (signal or moved):
            st.run_any += 1
            st.run_signal = st.run_signal + 1 if signal else 0
            self._note(conn, "R3-02", st.run_any, where)
            if signal:
                for rid in ("R3.4.1-18", "R4-03"):
                    self._note(conn, rid, st.run_signal, where)
        else:
            st.run_any = st.run_signal = 0
        st.key = key
        if data_ack is not None:
            st.data_ack = data_ack

    def _note(self, conn: Connection, rid: str, run: int, where: Where) -> None:
        longest = conn.scratch.setdefault(self, {})
        best = longest.get(rid)
        if best is None or run > best[0]:
            longest[rid] = (run, where)

    def judge(self, conn: Connection) -> Iterable[Judgment]:
        for rid, what in self.RIDS.items():
            best = conn.scratch.get(self, {}).get(rid)
            if best is None:
                continue
            run, where = best
            yield Judgment(rid, FAIL if run > 2 else PASS,
                           f"the longest run of duplicate ACKs sent only for {what} is {run}; at most two are "
                           "wanted", [where])


class WindowRules(StreamRules):
    """§3.3.4: the connection-level right window edge (Data ACK + scaled window) never moves back.
    Judged per subflow direction; the window's scale granularity (2^shift - 1 bytes) is not counted
    as moving back. Links reorder (veth queues per CPU do), and a segment that arrives late carries
    the older edge it was sent with: a segment whose TCP ACK is behind one already seen from that
    host, or whose data is behind with the same ACK, was sent earlier and is not compared."""

    WANTS: ClassVar[dict[str, tuple[str, str]]] = {
        "R3.3.4-01": ("the right edge (Data ACK + window << scale) never moves backwards",
                           "segments with a Data ACK")}

    def __call__(self, conn: Connection, sub: Subflow, where: Where, p: Packet, side: int, cs: int) -> None:
        if p.flags & (SYN | RST) or conn.fallback is not None:
            return
        dss = _dss(p)
        if dss is None or not dss["flags"] & DSS_A:
            return
        both = sub.scratch.get(self)
        if both is None:  # per direction: [highest (TCP ACK, data end) seen, (best edge, where)]
            both = sub.scratch[self] = ([None, None], [None, None])
        st = both[side]
        end = (p.seq + p.payload_len) % 2**32
        last = st[0]
        if last is not None:
            if seq_after(last[0], p.ack) or (p.ack == last[0] and seq_after(last[1], p.seq)):
                return  # sent before a segment already seen
            if p.ack == last[0] and not seq_after(end, last[1]):
                end = last[1]
        st[0] = (p.ack, end)
        ack = conn.expand_dsn(1 - cs, dss["data_ack"], 64 if dss["flags"] & DSS_A8 else 32)
        ws = sub.wscale[side] if None not in sub.wscale else 0
        ws = min(ws or 0, 14)
        edge = ack + (p.window << ws)
        best = st[1]
        t = self.tally(conn, "R3.3.4-01")
        if best is not None and edge + (1 << ws) <= best[0]:
            t.bad(where, f"right edge {edge:#x} (Data ACK {ack:#x} + {p.window} << {ws}) is {best[0] - edge} "
                         f"bytes behind {best[0]:#x} at {best[1]}")
            return
        t.ok(where)
        if best is None or edge > best[0]:
            st[1] = (edge, where)


class _ConnAcks:
    __slots__ = ("every", "first64")

    def __init__(self) -> None:
        self.first64: list[int | None] = [None, None]
        self.every = [[0, 0], [0, 0]]


class DataAckRules(StreamRules):
    WANTS: ClassVar[dict[str, tuple[str, str]]] = {
        "R3.3.2-01": ("data sent with 64-bit DSNs is Data-ACKed with 64-bit Data ACKs",
                      "Data ACKs covering 64-bit mapped data"),
        "R3.3.2-06": ("a Data ACK is sent only when its value advances", "segments carrying a Data ACK"),
        "R3.3.2-L01": ("a Data ACK never acknowledges data (or a DATA_FIN) the peer has not sent",
                       "Data ACKs"),
        "R3.7-16": ("after the peer's infinite mapping has arrived, no more Data ACKs",
                    "segments acknowledging the infinite mapping"),
    }

    def __init__(self, complete: bool = False) -> None:
        # With every subflow in the captures (the Lab's case), a Data ACK beyond all the data the
        # peer mapped so far acknowledges unsent data; with some paths missing it may not.
        self.complete = complete

    @property
    def ids(self) -> tuple[str, ...]:
        return (*self.WANTS, "R3.3.2-05")

    def __call__(self, conn: Connection, sub: Subflow, where: Where, p: Packet, side: int, cs: int) -> None:
        if p.flags & SYN or conn.fallback is not None or None in conn.keys:
            return
        dss = None
        mpc = False
        for name, f in p.options:
            if name == "DSS":
                dss = f
            elif name == "MPCapable":
                mpc = True
        flags = dss["flags"] if dss is not None else 0
        cst = conn.scratch.get((self, "acks"))
        if cst is None:  # first 64-bit DSN of each side; [with, without] Data ACK segments of each side
            cst = conn.scratch[(self, "acks")] = _ConnAcks()
        sst = sub.scratch.get(self)
        if sst is None:  # per direction: [last Data ACK sent, (where, end seq) of an infinite mapping]
            sst = sub.scratch[self] = ([None, None], [None, None])
        if flags & DSS_M:
            # "If data is received with a 64-bit DSN" (§3.3.2): a stand-alone DATA_FIN is no data.
            if flags & DSS_M8 and p.payload_len and cst.first64[cs] is None:
                cst.first64[cs] = dss["dsn"]
            if dss.get("data_level_length") == 0:
                sst[side][1] = (where, (p.seq + p.payload_len) % 2**32)
        if not mpc and not p.flags & RST:
            cst.every[cs][0 if flags & DSS_A else 1] += 1
        inf = sst[1 - side][1]
        if inf is not None and p.flags & ACK and not seq_after(inf[1], p.ack):
            t = self.tally(conn, "R3.7-16")
            if flags & DSS_A:
                t.bad(where, f"a Data ACK after the peer's infinite mapping at {inf[0]} was acknowledged")
            else:
                t.ok(where)
        if not flags & DSS_A:
            return
        wide = bool(flags & DSS_A8)
        peer = 1 - cs
        ack = conn.expand_dsn(peer, dss["data_ack"], 64 if wide else 32)
        first64 = cst.first64[peer]
        if first64 is not None and _ahead(ack, first64):
            t = self.tally(conn, "R3.3.2-01")
            if wide:
                t.ok(where)
            else:
                t.bad(where, f"a 32-bit Data ACK {dss['data_ack']:#x} for data the peer mapped with 64-bit DSNs")
        t = self.tally(conn, "R3.3.2-06")
        if sst[side][0] == ack:
            t.bad(where, f"Data ACK {ack:#x} again, unchanged")
        else:
            t.ok(where)
        sst[side][0] = ack
        self._bounded(conn, where, peer, ack)

    def _bounded(self, conn: Connection, where: Where, peer: int, ack: int) -> None:
        fin = conn.data_fin_dsn[peer]
        limit, what = None, ""
        if fin is not None:
            limit, what = (fin + 1) % 2**64, f"the peer's DATA_FIN at {fin:#x}, plus one"
        elif self.complete:
            end = conn.dsn_end[peer]
            if end is None and conn.idsn(peer) is not None:
                end = (conn.idsn(peer) + 1) % 2**64
            limit, what = end, "the end of all data the peer has mapped so far"
        if limit is None:
            return
        t = self.tally(conn, "R3.3.2-L01")
        if _ahead(ack, limit):
            t.bad(where, f"Data ACK {ack:#x} is beyond {what} ({limit:#x})")
        else:
            t.ok(where)

    def judge(self, conn: Connection) -> Iterable[Judgment]:
        yield from super().judge(conn)
        cst = conn.scratch.get((self, "acks"))
        for cs, who in ((0, "initiator"), (1, "listener")):
            counts = cst.every[cs] if cst else None
            if counts and counts[0] and not counts[1]:
                yield Judgment("R3.3.2-05", PASS, f"the {who} puts a Data ACK in every segment ({counts[0]}) "
                               "after the handshake, as it may")


def stream_rules(complete: bool = False) -> list[StreamRules]:
    return [MappingRules(), DuplicateAckRules(), WindowRules(), DataAckRules(complete)]


def stream_rule_ids() -> set[str]:
    return {rid for rule in stream_rules() for rid in rule.ids}
