"""The kernel's MIB counters (MPTcpExt*) as a third oracle for the passive checker.

After a transfer the Lab holds, per node, the deltas of the kernel's MPTCP counters, and the
captures of every interface. This module derives from the captures what each counter should have
counted on each node, and compares: a counter that disagrees with the wire means that our model
of the capture, the capture itself, or the kernel's accounting is wrong, and says which frames to
look at.

Vantage. A counter counts what one node's kernel received or sent, so each node is judged on the
captures of its own interfaces: a segment counts as received by the node if its destination is
one of the node's addresses, as sent if its source is. Segments lost between the hosts (shaped
links drop) are then never credited to the wrong side, and the node's captures of all its
interfaces are merged by time, so "what the node sent next on this subflow" is known. The
connection model (conformance.observe.model) gives what one packet cannot: the keys (join HMACs,
ADD_ADDR HMACs, MP_FASTCLOSE keys), which connection a join's token names, and whether the
handshake negotiated checksums or fell back.

Semantics (Linux 6.18: net/mptcp/{subflow,options,pm}.c, checked on live transfers, see
tests/test_counter_oracle.py):
- handshake counters (MPCapable*, MPJoin*) count once per subflow, when the request socket or the
  connecting socket handles the handshake: a retransmitted SYN, SYN/ACK or third ACK is not
  counted again; the node's answer (SYN/ACK, third ACK, ACK, or RST) tells whether it accepted;
- option counters (AddAddr, EchoAdd, RmAddr, MPPrioRx, MPFastcloseRx, MPRstRx, MPFailRx, ...)
  count every segment whose options a subflow socket reads (mptcp_incoming_options()), a
  retransmitted ADD_ADDR included: not on a request socket, not after the subflow is gone, and on
  the initiator only once a Data ACK has made it fully established; a reset only if it is in
  sequence (RFC 5961), so a reset answered by a challenge ACK is not read;
- transmit counters count when the option is written into a segment the stack builds: a segment
  split afterwards (GSO) repeats the option on the wire, and a reset the stack sends in reply to
  a segment no socket takes carries MP_TCPRST without counting it.
Where the wire cannot decide (the kernel refused a join for a reason the wire does not show, a
connection stalled before the kernel read a segment), the observation is "possible": the
comparison is then a range, [definite, definite + possible]. DataCsumErr is compared zero versus
nonzero (the captures keep headers, not the payload a checksum covers)."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from conformance.observe.model import ACK, FIN, RST, SYN, Connection, Where, merged_packets
from conformance.wire import crypto
from conformance.wire.bulk import Packet

PREFIX = "MPTcpExt"
EXACT, RANGE, NONZERO = "exact", "range", "zero vs nonzero"
EVIDENCE = 4  # frames kept per counter and kind (definite, possible)

# The counters compared, each with what the capture must show for the kernel to count it. Only
# counters whose semantics were checked against live kernel transfers are here.
COUNTERS: dict[str, str] = {
    # MP_CAPABLE (§3.1)
    "MPCapableSYNTX": "subflows this node opened with an MP_CAPABLE SYN (once per connect, not per SYN)",
    "MPCapableSYNRX": "MP_CAPABLE SYNs received by this listener, once per subflow (the request socket's)",
    "MPCapableSYNACKRX": "MP_CAPABLE SYN/ACKs received for this node's MP_CAPABLE SYN, once per subflow",
    "MPCapableFallbackSYNACK": "SYN/ACKs without MP_CAPABLE received for this node's MP_CAPABLE SYN",
    "MPCapableACKRX": "first segments after this listener's MP_CAPABLE SYN/ACK that carry MP_CAPABLE",
    "MPCapableFallbackACK": "first segments after this listener's MP_CAPABLE SYN/ACK without MP_CAPABLE",
    # MP_JOIN (§3.2)
    "MPJoinSynTx": "subflows this node opened with an MP_JOIN SYN (once per connect)",
    "MPJoinSynRx": "MP_JOIN SYNs received by an MPTCP listener of this node, once per subflow",
    "MPJoinSynBackupRx": "MP_JOIN SYNs counted in MPJoinSynRx that carry the backup flag B",
    "MPJoinPortSynRx": "MP_JOIN SYNs counted in MPJoinSynRx to a port other than the connection's own "
                       "(announced in ADD_ADDR)",
    "MPJoinNoTokenFound": "MP_JOIN SYNs whose token names no connection of this node (answered with RST)",
    "MPJoinSynAckRx": "MP_JOIN SYN/ACKs received whose HMAC verifies and that the node accepted "
                      "(answered with the third ACK)",
    "MPJoinSynAckBackupRx": "MP_JOIN SYN/ACKs counted in MPJoinSynAckRx that carry the backup flag B",
    "MPJoinPortSynAckRx": "MP_JOIN SYN/ACKs counted in MPJoinSynAckRx on a subflow to a port other than "
                          "the connection's own",
    "MPJoinAckRx": "MP_JOIN third ACKs received whose HMAC verifies and that the node accepted",
    "MPJoinPortAckRx": "MP_JOIN third ACKs counted in MPJoinAckRx on a subflow to a port other than the "
                       "connection's own",
    "MPJoinSynAckHMacFailure": "MP_JOIN SYN/ACKs received whose truncated HMAC does not verify",
    "MPJoinAckHMacFailure": "MP_JOIN third ACKs received whose HMAC does not verify (or that the node "
                            "could not accept)",
    # ADD_ADDR / REMOVE_ADDR (§3.4)
    "AddAddr": "ADD_ADDRs (E=0) whose HMAC verifies read by a subflow of this node, every copy",
    "AddAddrTx": "ADD_ADDRs (E=0) written by this node",
    "EchoAdd": "ADD_ADDR echoes (E=1) read by a subflow of this node",
    "EchoAddTx": "ADD_ADDR echoes written by this node",
    "PortAdd": "ADD_ADDRs and echoes counted above that carry a port",
    "RmAddr": "address IDs in REMOVE_ADDRs read by a subflow of this node (fewer if RmAddrDrop)",
    "RmAddrTx": "address IDs in REMOVE_ADDRs written by this node",
    # MP_PRIO (§3.3.8), MP_FASTCLOSE (§3.5), MP_TCPRST (§3.6), MP_FAIL and fallback (§3.7)
    "MPPrioRx": "MP_PRIOs read by a subflow of this node",
    "MPPrioTx": "MP_PRIOs written by this node",
    "MPFastcloseRx": "MP_FASTCLOSEs carrying this node's key read by a subflow of this node",
    "MPFastcloseTx": "MP_FASTCLOSEs written by this node",
    "MPRstRx": "MP_TCPRSTs on resets a subflow of this node took (in sequence)",
    "MPRstTx": "MP_TCPRSTs on resets a subflow socket of this node sent (not on stateless replies)",
    "MPFailRx": "MP_FAILs read by a subflow of this node",
    "MPFailTx": "MP_FAILs written by this node",
    "InfiniteMapRx": "data segments received with an infinite mapping (DSS data-level length 0), "
                     "counted when the subflow reads them",
    "InfiniteMapTx": "infinite mappings sent by this node, counted when queued (one owed after the "
                     "peer's MP_FAIL may count before it leaves)",
    "DataCsumErr": "DSS checksum failures: possible only if a connection uses checksums, certain if "
                   "the node sent a connection's first MP_FAIL",
}

# The kernel counted an MP_JOIN SYN/ACK HMAC failure as MPJoinAckHMacFailure until commit
# c4a99a921949 ("mptcp: use MPJoinSynAckHMacFailure for SynAck HMAC failure", 2026, in stable
# kernels since): a kernel with or without it is right if the sum of both is. So each of the two
# alone gets the range either version allows, and their sum is compared exactly.
HMAC_SUM = f"{PREFIX}MPJoinSynAckHMacFailure+{PREFIX}MPJoinAckHMacFailure"
SYNACK_HMAC, ACK_HMAC = "synack_hmac_failure", "ack_hmac_failure"  # tallied apart, compared below
CSUM_FAIL = "checksum_failure"


@dataclass(frozen=True)
class CounterAgreement:
    """One counter on one node: what the captures imply against what the kernel counted."""

    node: str
    counter: str  # as in /proc/net/netstat with its group, e.g. MPTcpExtMPJoinSynRx
    implied: int  # what the captures show for certain
    possible: int  # further observations the kernel may or may not have counted
    kernel: int  # the kernel's delta over the transfer
    low: int  # the kernel values that agree with the captures: low..high (None: no bound)
    high: int | None
    how: str  # exact | range | zero vs nonzero
    explanation: str
    where: tuple[Where, ...] = ()

    @property
    def agree(self) -> bool:
        return self.low <= self.kernel and (self.high is None or self.kernel <= self.high)

    @property
    def expected(self) -> str:
        if self.high == self.low:
            return str(self.low)
        return f">= {self.low}" if self.high is None else f"{self.low}..{self.high}"

    def __str__(self) -> str:
        frames = ", ".join(str(w) for w in self.where[:3])
        verdict = "agree" if self.agree else "DISAGREE"
        return (f"{self.node} {self.counter.removeprefix(PREFIX)}: kernel {self.kernel}, captures "
                f"{self.expected} ({self.how}) {verdict}: {self.explanation}" + (f" [{frames}]" if frames else ""))


# -- tallies ------------------------------------------------------------------------------------

@dataclass
class _Count:
    sure: int = 0
    maybe: int = 0
    where: list[Where] = field(default_factory=list)
    maybe_where: list[Where] = field(default_factory=list)
    why_maybe: dict[str, int] = field(default_factory=dict)


class _Tally:
    def __init__(self) -> None:
        self.counts: dict[str, _Count] = {}

    def sure(self, name: str, where: Where, n: int = 1) -> None:
        c = self.counts.setdefault(name, _Count())
        c.sure += n
        if len(c.where) < EVIDENCE:
            c.where.append(where)

    def maybe(self, name: str, where: Where, why: str, n: int = 1) -> None:
        c = self.counts.setdefault(name, _Count())
        c.maybe += n
        c.why_maybe[why] = c.why_maybe.get(why, 0) + n
        if len(c.maybe_where) < EVIDENCE:
            c.maybe_where.append(where)

    def get(self, name: str) -> _Count:
        return self.counts.get(name, _Count())


# -- one subflow as one node sees it ------------------------------------------------------------

SEQ = 0xFFFFFFFF


@dataclass
class _Flow:
    conn: Connection | None
    n_initiated: bool  # the node sent this subflow's SYN
    n_side: int | None = None  # the node's side of the connection: 0 initiator, 1 listener
    join: bool = False
    syn_sent: bool = False  # the node sent a SYN (its connect was counted)
    last_syn_mpc: bool = False  # the node's latest SYN on it carried MP_CAPABLE
    synack_seen: bool = False  # the node (as initiator) received a SYN/ACK
    syn_seen: bool = False  # the node (as listener) received a SYN
    first_ack_seen: bool = False  # the node (as listener) received the segment after the handshake
    sent_synack: str | None = None  # the node's SYN/ACK: "MPCapable", "MPJoinSynAck" or "" (plain)
    nonces: list[int | None] = field(default_factory=lambda: [None, None])  # initiator's, responder's
    different_port: bool = False  # not the port of the connection's initial subflow
    established: bool = False  # the listener's child socket exists (the handshake completed on it)
    fully_established: bool = False  # the initiator's subflow has seen the peer's Data ACK
    closed: bool | None = False  # the node's socket for it is gone (a reset took effect); None: perhaps
    # A received reset the captures place in sequence: whether the node's stack read it (it may have
    # discarded data the capture shows, e.g. unmapped data before a join is fully established) is
    # told by what the node sends next (see _settle_reset).
    held_reset: tuple[Where, Packet, list] | None = None
    fallen_back: bool = False  # fell back after the handshake: the node ignores MPTCP options from now
    infinite_rx: Where | None = None  # an infinite mapping received and not yet known to be read
    pending: list[tuple[str, Where, bool]] = field(default_factory=list)  # decision, where, flag
    last_tx: tuple[int, frozenset[str]] | None = None  # end seq and options of the node's last data segment
    # The peer's sequence space as the node received it, relative to the peer's ISN: the next
    # expected byte, and segments received beyond a hole (start -> end).
    peer_isn: int | None = None
    rcv_nxt: int = 1
    ooo: dict[int, int] = field(default_factory=dict)
    peer_fin: bool = False  # the node received the peer's FIN
    n_fin_end: int | None = None  # the sequence number after the node's FIN, and whether it is acked
    n_fin_acked: bool = False

    def received_data(self, p: Packet) -> None:
        if p.flags & ACK and self.n_fin_end is not None and (p.ack - self.n_fin_end) & SEQ < 1 << 31:
            self.n_fin_acked = True
        if self.peer_isn is None:
            return
        length = p.payload_len + (1 if p.flags & FIN else 0)
        if not length:
            return
        start = (p.seq - self.peer_isn) & SEQ
        end = start + length
        if p.flags & FIN:
            self.peer_fin = True
        if start > self.rcv_nxt:
            self.ooo[start] = max(self.ooo.get(start, 0), end)
            return
        self.rcv_nxt = max(self.rcv_nxt, end)
        while self.ooo:
            nxt = min(self.ooo)
            if nxt > self.rcv_nxt:
                break
            self.rcv_nxt = max(self.rcv_nxt, self.ooo.pop(nxt))

    def reset_takes(self, p: Packet) -> bool | None:
        """Whether a received reset takes effect, as Linux applies RFC 5961: its sequence number
        is the next expected one, or one less in the states after the peer's FIN (CLOSE_WAIT,
        CLOSING, LAST_ACK: tcp_reset_check()). Otherwise it earns a challenge ACK and is not read;
        in TIME_WAIT (both FINs acknowledged) no MPTCP socket reads it either. None: unknown."""
        if self.peer_isn is None:
            return None
        if self.peer_fin and self.n_fin_acked:
            return False
        rel = (p.seq - self.peer_isn) & SEQ
        return rel == self.rcv_nxt or (rel + 1 == self.rcv_nxt and self.peer_fin)


@functools.lru_cache(maxsize=4096)  # a capture holds a handful of addresses, millions of times
def _norm(addr: str) -> str:
    try:
        ip = ipaddress.ip_address(addr.split("%")[0])
    except ValueError:
        return addr
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.compressed


def _fallen_back(conn: Connection, where: Where) -> str | None:
    """Whether the connection runs as plain TCP at `where`: "handshake" (it never ran MPTCP), "later"
    (from the point one side stopped speaking MPTCP, e.g. after MP_FAIL: the two hosts do not drop
    out at the same instant, and the MP_FAIL answering one may still be read), or None."""
    if conn.fallback is None:
        return None
    if conn.fallback_from is None:
        return "handshake"
    return "later" if where.time >= conn.fallback_from.time else None


def _first(opts: list[tuple[str, dict]], name: str) -> dict | None:
    return next((f for n, f in opts if n == name), None)


def _infinite(f: dict) -> bool:
    return bool(f["flags"] & 0x04) and f.get("data_level_length") == 0


class _NodeView:
    """Streams one node's captures and tallies what its kernel should have counted."""

    def __init__(self, node: str, addresses: Iterable[str], connections: Sequence[Connection]) -> None:
        self.node = node
        self.addrs = {_norm(a) for a in addresses}
        self.tally = _Tally()
        self.flows: dict[frozenset, _Flow] = {}
        self.checksum = False  # some MPTCP connection of the node negotiated DSS checksums
        self.involved = False  # the node is an end of a connection of the model
        self._fail_seen: set[int] = set()  # connections on which an MP_FAIL crossed the node
        # Connections on which the node answered the peer's MP_FAIL (and so owes an infinite
        # mapping, §3.7), and those on which it sent one.
        self._owed_infinite: dict[int, Where] = {}
        self._sent_infinite: set[int] = set()
        self._initial: dict[frozenset, Connection] = {}
        self._tokens: dict[int, tuple[Connection, int]] = {}
        for conn in connections:
            # Its tuple, and the ones a NAT made of it: a node behind it sees one, its peer another.
            for a, ap, b, bp in (conn.subflows[0].tuple4, *conn.subflows[0].translated):
                self._initial[frozenset(((_norm(a), ap), (_norm(b), bp)))] = conn
            for side in (0, 1):
                tok = conn.token(side)
                if tok is not None:
                    self._tokens[tok] = (conn, side)

    def feed(self, where: Where, p: Packet) -> None:
        src, dst = _norm(p.src), _norm(p.dst)
        rx, tx = dst in self.addrs, src in self.addrs
        if rx == tx:  # forwarded, or to itself: not a segment between this node and a peer
            return
        key = frozenset(((src, p.sport), (dst, p.dport)))
        flow = self.flows.get(key)
        opts = p.options
        if flow is None:
            if p.flags & (SYN | ACK) != SYN:
                return  # a subflow whose SYN these captures do not hold: nothing to pair it with
            flow = self.flows[key] = self._open(key, rx, opts, p)
        names = {n for n, _ in opts}
        if tx:
            self._sent(flow, where, p, names, opts)
        else:
            self._received(flow, where, p, names, opts)
            if "MPFail" in names and flow.conn is not None:
                self._fail_seen.add(id(flow.conn))

    def _open(self, key: frozenset, rx: bool, opts: list, p: Packet) -> _Flow:
        flow = _Flow(self._initial.get(key), n_initiated=not rx)
        join = _first(opts, "MPJoinSyn")
        if _first(opts, "MPCapable") is None and join is not None:
            flow.join = True
            found = self._tokens.get(join["receiver_token"])
            if found is not None:
                flow.conn, responder = found
                flow.n_side = responder if rx else 1 - responder
                # The MPTCP socket's own ports are those of the connection's initial subflow.
                _, initiator_port, _, listener_port = flow.conn.subflows[0].tuple4
                responder_port = listener_port if responder == 1 else initiator_port
                flow.different_port = p.dport != responder_port
        elif flow.conn is not None:
            flow.n_side = 1 if rx else 0
        if flow.conn is not None:
            self.involved = True
            self.checksum = self.checksum or bool(flow.conn.checksum)
        return flow

    # -- what the node received ------------------------------------------------------------------
    def _received(self, flow: _Flow, where: Where, p: Packet, names: set[str], opts: list) -> None:
        t = self.tally
        syn, ack = bool(p.flags & SYN), bool(p.flags & ACK)
        if syn and not ack:
            if flow.n_initiated:
                return  # a simultaneous open: not something these counters describe
            flow.peer_isn = p.seq
            if flow.syn_seen:
                return  # a retransmitted SYN meets the request socket: nothing is counted again
            flow.syn_seen = True
            if "MPCapable" in names:
                flow.pending.append(("mpc_syn", where, False))
            elif (f := _first(opts, "MPJoinSyn")) is not None:
                flow.nonces[0] = f["sender_random"]
                flow.pending.append(("join_syn", where, bool(f["backup"])))
            return
        if syn and ack:
            if not flow.n_initiated or flow.synack_seen:
                return  # only the first SYN/ACK finishes the connect
            flow.synack_seen = True
            flow.peer_isn = p.seq
            if flow.last_syn_mpc:
                t.sure("MPCapableSYNACKRX" if "MPCapable" in names else "MPCapableFallbackSYNACK", where)
            elif flow.join:
                self._join_synack(flow, where, opts)
            return
        if not p.flags & RST:
            flow.received_data(p)
        if not flow.n_initiated and not flow.first_ack_seen and flow.sent_synack is not None and not p.flags & RST:
            # The first segment after the SYN/ACK creates the listener's child socket.
            flow.first_ack_seen = True
            if flow.sent_synack == "MPCapable":
                fallback = "MPCapable" not in names
                t.sure("MPCapableFallbackACK" if fallback else "MPCapableACKRX", where)
                flow.established, flow.fallen_back = True, fallback
            elif flow.sent_synack == "MPJoinSynAck":
                self._join_ack(flow, where, opts)
            return
        if flow.closed is True or not (flow.synack_seen if flow.n_initiated else flow.established):
            return  # no subflow socket on the node (a request socket, or none): no MPTCP option is read
        sure = True
        doubt = "before the subflow is fully established"
        if flow.closed is None:
            sure, doubt = False, "after a reset that may have closed the subflow"
        if flow.n_initiated and not flow.fully_established:
            # check_fully_established(): the initiator's subflow reads options once a Data ACK
            # (or an ADD_ADDR) from the peer has made it fully established, from that segment on.
            # Before, depending on the sequence number, the kernel reads them, falls back (MP_CAPABLE)
            # or resets (MP_JOIN): possible only.
            if any((n == "DSS" and f["flags"] & 0x01) or (n == "AddAddr" and not f["echo"]) for n, f in opts):
                flow.fully_established = True
            else:
                sure = False
        if p.flags & RST:
            takes = flow.reset_takes(p)
            if takes is False:
                return  # out of sequence: a challenge ACK, the reset and its options are not read
            if takes and sure and not flow.n_fin_acked:
                flow.held_reset, flow.closed = (where, p, opts), True
                return
            if not sure:
                why = doubt
            elif takes is None:
                why = "reset whose sequence number the captures cannot place"
            else:
                # A subflow the node closed becomes, once its FIN is acknowledged, a FIN_WAIT2
                # timewait socket (tcp_time_wait()) that reads no MPTCP option; one it only shut
                # down stays a full socket that does. The captures cannot tell the two apart.
                why = "reset after the node's FIN was acknowledged (FIN_WAIT2: a timewait socket if orphaned)"
            self._established_rx(flow, where, p, opts, sure=sure and bool(takes) and not flow.n_fin_acked,
                                 why=why)
            flow.closed = True if takes else None
            return
        self._established_rx(flow, where, p, opts, sure=sure, why=doubt)

    def _settle_reset(self, flow: _Flow, p: Packet | None) -> None:
        """The held reset, once the node's next segment on the subflow (`p`; None: it sent none)
        shows whether its stack read it. A reset with ACK is written by a socket: usually the node's
        socket outlived the reset (or reset first itself) and did not read it, but a fast close
        that resets every subflow in turn (Linux 6.1, MP_FASTCLOSE on a RST) may read the peer's
        reset and still write its own on that subflow: either. A reset without ACK is a stateless
        reply: no socket any more, the reset was read, as when the node falls silent. Any other
        segment is a challenge ACK, or was queued before the reset arrived: either."""
        where, rst, opts = flow.held_reset
        flow.held_reset = None
        if p is None or (p.flags & RST and not p.flags & ACK):
            self._established_rx(flow, where, rst, opts, sure=True, why="")
        elif p.flags & RST:
            flow.closed = False  # its own reset, which follows, is written by a live socket
            self._established_rx(flow, where, rst, opts, sure=False,
                                 why="the node reset the subflow after this reset (not read, or read by a "
                                     "fast close resetting every subflow in turn)")
        else:
            flow.closed = None
            self._established_rx(flow, where, rst, opts, sure=False,
                                 why="the node sent on the subflow after this reset (a challenge ACK, or "
                                     "segments queued before it arrived)")

    def _join_keys(self, flow: _Flow) -> tuple[int | None, int | None]:
        """(responder's key, initiator's key) of a join subflow."""
        if flow.conn is None or flow.n_side is None:
            return None, None
        responder = flow.n_side if not flow.n_initiated else 1 - flow.n_side
        return flow.conn.keys[responder], flow.conn.keys[1 - responder]

    def _join_synack(self, flow: _Flow, where: Where, opts: list) -> None:
        f = _first(opts, "MPJoinSynAck")
        if f is None:
            return  # the kernel resets the subflow and counts nothing
        flow.nonces[1] = f["sender_random"]
        responder, initiator = self._join_keys(flow)
        if None in (responder, initiator, *flow.nonces):
            self.tally.maybe(SYNACK_HMAC, where, "keys unknown: HMAC not checked")
        elif not crypto.verify_join_synack(f["sender_truncated_hmac"], responder, initiator, flow.nonces[1],
                                           flow.nonces[0]):
            self.tally.sure(SYNACK_HMAC, where)
            return
        flow.pending.append(("join_synack", where, bool(f["backup"])))

    def _join_ack(self, flow: _Flow, where: Where, opts: list) -> None:
        f = _first(opts, "MPJoinAck")
        responder, initiator = self._join_keys(flow)
        if f is None:
            self.tally.sure(ACK_HMAC, where)  # no MP_JOIN on the third ACK: refused like a bad HMAC
            return
        if None in (responder, initiator, *flow.nonces):
            self.tally.maybe(ACK_HMAC, where, "keys unknown: HMAC not checked")
        elif not crypto.verify_join_ack(f["sender_hmac"], initiator, responder, flow.nonces[0], flow.nonces[1]):
            self.tally.sure(ACK_HMAC, where)
            return
        flow.pending.append(("join_ack", where, False))

    def _established_rx(self, flow: _Flow, where: Where, p: Packet, opts: list, sure: bool, why: str) -> None:
        """Options the receiving subflow hands to mptcp_incoming_options()."""
        conn = flow.conn
        if conn is None or not opts or flow.fallen_back:
            return  # a fallen-back connection ignores MPTCP options
        fallen = _fallen_back(conn, where)
        if fallen == "handshake":
            return
        if fallen == "later":
            sure, why = False, f"after the connection fell back ({conn.fallback})"

        def count(name: str, n: int = 1) -> None:
            if sure:
                self.tally.sure(name, where, n)
            else:
                self.tally.maybe(name, where, why, n)

        for name, f in opts:
            if name == "AddAddr":
                self._add_addr_rx(flow, where, f, count)
            elif name == "RemoveAddr":
                count("RmAddr", len(f["address_ids"]))
            elif name == "MPPrio":
                count("MPPrioRx")
            elif name == "MPFastclose" and flow.n_side is not None and f["receiver_key"] == conn.keys[flow.n_side]:
                count("MPFastcloseRx")
            elif name == "MPFail":
                count("MPFailRx")
            elif name == "MPTCPRst":
                count("MPRstRx")
            elif name == "DSS" and _infinite(f) and (p.payload_len or p.flags & FIN):
                # Counted when the subflow reads the segment (get_mapping_status()), which a
                # stalled connection may never do: certain once the node closes the subflow
                # cleanly afterwards (it read everything before its FIN), possible until then.
                # One arriving after the node itself fell back (the MP_FAIL sender may fall back
                # at once) or on a bare FIN may or may not reach the mapping code.
                flow.fallen_back = True
                if sure and p.payload_len:
                    flow.infinite_rx = where
                else:
                    self.tally.maybe("InfiniteMapRx", where, why if not sure else "on a FIN without data")

    def _add_addr_rx(self, flow: _Flow, where: Where, f: dict, count) -> None:
        conn = flow.conn
        if not f["echo"]:
            if flow.n_side is None or None in conn.keys:
                self.tally.maybe("AddAddr", where, "keys unknown: HMAC not checked")
                return
            hmac = f.get("truncated_hmac")
            if hmac is None or not crypto.verify_add_addr(
                    hmac, conn.keys[1 - flow.n_side], conn.keys[flow.n_side], f["address_id"],
                    ipaddress.ip_address(f["address"]).packed, f.get("port")):
                return  # a wrong HMAC: the kernel drops the option uncounted
        count("EchoAdd" if f["echo"] else "AddAddr")
        if f.get("port"):
            count("PortAdd")

    # -- what the node sent ----------------------------------------------------------------------
    def _sent(self, flow: _Flow, where: Where, p: Packet, names: set[str], opts: list) -> None:
        t = self.tally
        if flow.held_reset is not None:
            self._settle_reset(flow, p)
        if flow.pending:
            self._resolve(flow, p, names)
        syn, ack, rst = bool(p.flags & SYN), bool(p.flags & ACK), bool(p.flags & RST)
        if syn and not ack:
            mpc, join = "MPCapable" in names, _first(opts, "MPJoinSyn")
            if not flow.syn_sent:  # the connect is counted once, not each SYN (re)transmission
                if mpc:
                    t.sure("MPCapableSYNTX", where)
                elif join is not None:
                    t.sure("MPJoinSynTx", where)
            if join is not None:
                flow.nonces[0] = join["sender_random"]
            flow.syn_sent, flow.last_syn_mpc = True, mpc
            return
        if syn and ack:
            if flow.sent_synack is None:
                flow.sent_synack = "MPCapable" if "MPCapable" in names else (
                    "MPJoinSynAck" if "MPJoinSynAck" in names else "")
            if (f := _first(opts, "MPJoinSynAck")) is not None:
                flow.nonces[1] = f["sender_random"]
            return
        if p.flags & FIN and flow.n_fin_end is None:
            flow.n_fin_end = (p.seq + p.payload_len + 1) & SEQ
        if flow.infinite_rx is not None and p.flags & FIN:
            t.sure("InfiniteMapRx", flow.infinite_rx)
            flow.infinite_rx = None
        conn = flow.conn
        # A segment the stack splits after writing its options (GSO) repeats them on the wire: an
        # option on a data segment continuing the previous one, which carried it too, may be one
        # write.
        continued = p.payload_len > 0 and flow.last_tx is not None and flow.last_tx[0] == p.seq
        repeats = flow.last_tx[1] if continued and flow.last_tx is not None else frozenset()
        tags = set(names)
        if any(n == "DSS" and _infinite(f) for n, f in opts):
            tags.add("infinite")
        flow.last_tx = ((p.seq + p.payload_len) & SEQ, frozenset(tags)) if p.payload_len else None
        doubt = False
        if rst:
            # A reset written by a subflow socket carries ACK; one the stack sends in reply to a
            # segment no socket takes (tcp_v4_send_reset) has no ACK, or answers a SYN the node
            # never accepted. MPTCP options on those are copied from the refused segment's
            # reason, not written by an MPTCP socket: MPRstTx and MPFastcloseTx do not count them.
            active = ack and flow.closed is not True and (flow.syn_sent or flow.sent_synack is not None)
            doubt = flow.closed is None
            flow.closed = True
            if not active:
                return
        if conn is None or not opts or _fallen_back(conn, where) == "handshake":
            return  # options written after a later fallback were still written (MP_FAIL's answer)

        def count(name: str, tag: str, n: int = 1) -> None:
            if tag in repeats:
                t.maybe(name, where, "option repeated on a continued data segment (one GSO write?)", n)
            elif rst and doubt:
                t.maybe(name, where, "a reset after one the node may have read (then no socket wrote it)", n)
            else:
                t.sure(name, where, n)

        for name, f in opts:
            if name == "AddAddr":
                count("EchoAddTx" if f["echo"] else "AddAddrTx", name)
            elif name == "RemoveAddr":
                count("RmAddrTx", name, len(f["address_ids"]))
            elif name == "MPPrio":
                count("MPPrioTx", name)
            elif name == "MPFastclose":
                count("MPFastcloseTx", name)
            elif name == "MPFail":
                count("MPFailTx", name)
                if id(conn) in self._fail_seen:
                    self._owed_infinite.setdefault(id(conn), where)
                else:
                    # The first MP_FAIL of a connection follows a checksum failure; one sent after
                    # the peer's is the response that §3.7 asks for (no checksum failure here).
                    t.sure(CSUM_FAIL, where)
                    self._fail_seen.add(id(conn))
            elif name == "MPTCPRst" and rst:
                count("MPRstTx", name)
            elif name == "DSS" and _infinite(f) and p.payload_len and not flow.fallen_back:
                count("InfiniteMapTx", "infinite")
                flow.fallen_back = True
                self._sent_infinite.add(id(conn))

    def _resolve(self, flow: _Flow, p: Packet, names: set[str]) -> None:
        """Decisions that wait for the node's next segment on the subflow: how it answered."""
        t = self.tally
        rst = bool(p.flags & RST)
        synack = p.flags & (SYN | ACK) == SYN | ACK
        for decision, where, flag in flow.pending:
            if decision == "mpc_syn":
                if synack and "MPCapable" in names:
                    t.sure("MPCapableSYNRX", where)
                else:
                    # A listener that is not MPTCP does not count it; an MPTCP one that fell back does.
                    t.maybe("MPCapableSYNRX", where, "answered without MP_CAPABLE")
            elif decision == "join_syn":
                if synack and "MPJoinSynAck" in names:
                    t.sure("MPJoinSynRx", where)
                    if flag:
                        t.sure("MPJoinSynBackupRx", where)
                    if flow.different_port:
                        t.sure("MPJoinPortSynRx", where)
                elif rst:
                    # Refused by an MPTCP listener (counted, with the reason's counter) or by a
                    # port without a listener (not counted).
                    why = "answered with RST"
                    t.maybe("MPJoinSynRx", where, why)
                    if flag:
                        t.maybe("MPJoinSynBackupRx", where, why)
                    if flow.conn is None:
                        t.maybe("MPJoinNoTokenFound", where, "token of no connection in the captures, " + why)
            elif decision == "join_synack":
                if rst:
                    continue  # refused after the HMAC check (mptcp_finish_join): nothing counted
                t.sure("MPJoinSynAckRx", where)
                if flag:
                    t.sure("MPJoinSynAckBackupRx", where)
                if flow.different_port:
                    t.sure("MPJoinPortSynAckRx", where)
            elif decision == "join_ack":
                if rst:
                    # The HMAC verifies, yet the join was refused: a full PM counts it as an HMAC
                    # failure, a port not announced or a closing connection do not.
                    t.maybe(ACK_HMAC, where, "HMAC verifies but the node refused the join")
                    continue
                t.sure("MPJoinAckRx", where)
                if flow.different_port:
                    t.sure("MPJoinPortAckRx", where)
                flow.established = True
        flow.pending.clear()

    def finish(self) -> None:
        """Decisions still waiting when the captures end: the kernel may have gone either way."""
        for conn_id, where in self._owed_infinite.items():
            if conn_id not in self._sent_infinite:
                # The kernel counts the infinite mapping when it attaches it to queued data
                # (mptcp_sendmsg_frag()); a connection that stalls may never send that data.
                self.tally.maybe("InfiniteMapTx", where, "owed after the peer's MP_FAIL, not on the wire")
        for flow in self.flows.values():
            if flow.held_reset is not None:
                self._settle_reset(flow, None)
            if flow.infinite_rx is not None:
                self.tally.maybe("InfiniteMapRx", flow.infinite_rx,
                                 "the node never closed the subflow cleanly: it may not have read it")
            for decision, where, _ in flow.pending:
                counter = {"mpc_syn": "MPCapableSYNRX", "join_syn": "MPJoinSynRx",
                           "join_synack": "MPJoinSynAckRx", "join_ack": "MPJoinAckRx"}[decision]
                self.tally.maybe(counter, where, "the node sent nothing more on the subflow")
            flow.pending.clear()


# -- the comparison -----------------------------------------------------------------------------

def _explain(c: _Count, text: str) -> str:
    out = f"{c.sure} {text}"
    if c.maybe:
        out += f"; {c.maybe} more possible (" + "; ".join(f"{n}: {w}" for w, n in c.why_maybe.items()) + ")"
    return out


class _Judge:
    """Turns one node's tally and kernel deltas into agreements."""

    def __init__(self, node: str, view: _NodeView, kernel: Mapping[str, int],
                 available: Collection[str] | None) -> None:
        self.node, self.view, self.kernel, self.available = node, view, kernel, available

    def has(self, name: str) -> bool:
        return self.available is None or PREFIX + name in self.available

    def value(self, name: str) -> int:
        return int(self.kernel.get(PREFIX + name, 0))

    def counted(self, name: str, c: _Count, text: str) -> CounterAgreement:
        """The kernel counted each definite observation and any of the possible ones."""
        return CounterAgreement(self.node, PREFIX + name, c.sure, c.maybe, self.value(name), c.sure,
                                c.sure + c.maybe, RANGE if c.maybe else EXACT, _explain(c, text),
                                tuple(c.where + c.maybe_where))

    def all(self) -> list[CounterAgreement]:
        tally = self.view.tally
        out = []
        for name, text in COUNTERS.items():
            if not self.has(name) or name in SPECIAL:
                continue
            c = tally.get(name)
            if name == "RmAddr" and self.value("RmAddrDrop"):
                # The PM was busy and dropped whole REMOVE_ADDRs (RmAddrDrop counts options, not
                # IDs): any number of the IDs may have gone uncounted.
                c = _Count(0, c.sure + c.maybe, [], c.where + c.maybe_where,
                           {"RmAddrDrop > 0: the PM dropped some": c.sure + c.maybe})
            out.append(self.counted(name, c, text))
        return out + self.hmac() + self.checksum()

    def hmac(self) -> list[CounterAgreement]:
        """MP_JOIN HMAC failures. A SYN/ACK's failure went to MPJoinAckHMacFailure before kernel
        commit c4a99a921949 and goes to MPJoinSynAckHMacFailure since: each counter alone may hold
        it or not, their sum must."""
        tally = self.view.tally
        synack, ack = tally.get(SYNACK_HMAC), tally.get(ACK_HMAC)
        n_synack = synack.sure + synack.maybe
        older = "MP_JOIN SYN/ACK HMAC failures, counted in MPJoinAckHMacFailure before kernel commit c4a99a921949"
        out = []
        if self.has("MPJoinSynAckHMacFailure"):
            c = _Count(0, n_synack, [], synack.where + synack.maybe_where,
                       {older.replace("counted in", "or in"): n_synack} if n_synack else {})
            out.append(self.counted("MPJoinSynAckHMacFailure", c, COUNTERS["MPJoinSynAckHMacFailure"]))
        if self.has("MPJoinAckHMacFailure"):
            c = _Count(ack.sure, ack.maybe + n_synack, list(ack.where), ack.maybe_where + synack.where,
                       dict(ack.why_maybe) | ({older: n_synack} if n_synack else {}))
            out.append(self.counted("MPJoinAckHMacFailure", c, COUNTERS["MPJoinAckHMacFailure"]))
        if self.has("MPJoinSynAckHMacFailure") and self.has("MPJoinAckHMacFailure"):
            c = _Count(synack.sure + ack.sure, synack.maybe + ack.maybe, synack.where + ack.where,
                       synack.maybe_where + ack.maybe_where, synack.why_maybe | ack.why_maybe)
            kernel = self.value("MPJoinSynAckHMacFailure") + self.value("MPJoinAckHMacFailure")
            out.append(CounterAgreement(
                self.node, HMAC_SUM, c.sure, c.maybe, kernel, c.sure, c.sure + c.maybe,
                RANGE if c.maybe else EXACT,
                _explain(c, "MP_JOIN HMAC failures received (SYN/ACK and third ACK, whichever counter)"),
                tuple(c.where + c.maybe_where)))
        return out

    def checksum(self) -> list[CounterAgreement]:
        """DataCsumErr counts failed DSS checksums, which the captures cannot recompute (they keep
        the headers only): zero versus nonzero is what is robust. Zero if no connection of the
        node uses checksums; nonzero if the node sent a connection's first MP_FAIL (§3.7: sent
        after a checksum failure; one sent after the peer's is the response); otherwise either."""
        if not self.has("DataCsumErr"):
            return []
        first = self.view.tally.get(CSUM_FAIL)
        low = 1 if first.sure else 0
        high = None if self.view.checksum else 0
        if self.view.checksum:
            text = f"{first.sure} connections on which the node sent the first MP_FAIL (after a checksum failure)"
            if not first.sure:
                text += "; DSS checksums are in use, so failures are possible"
        else:
            text = "no connection of the node uses DSS checksums: no checksum can fail"
        return [CounterAgreement(self.node, PREFIX + "DataCsumErr", first.sure, 0 if high == 0 else 1,
                                 self.value("DataCsumErr"), low, high, NONZERO, text, tuple(first.where))]


SPECIAL = ("MPJoinSynAckHMacFailure", "MPJoinAckHMacFailure", "DataCsumErr")  # judged apart


def compare_counters(connections: Sequence[Connection], counters: Mapping[str, Mapping[str, int]],
                     addresses: Mapping[str, Iterable[str]], captures: Mapping[str, Sequence[Path | str]],
                     *, available: Collection[str] | Mapping[str, Collection[str]] | None = None
                     ) -> list[CounterAgreement]:
    """Compare each node's MPTCP MIB counter deltas with what its own captures imply.

    connections: the passive checker's model of the same captures (rules.check() or model.build());
    counters: node -> counter deltas over the transfer (TransferRun.counters; absent means 0);
    addresses: node -> the addresses it owns (a segment to one of them is received by the node);
    captures: node -> the captures taken on that node's own interfaces (node_captures() builds it);
    available: the counter names the running kernel has (read_counters(pid).keys()), or node -> the
    names of that node's kernel (nodes may run different kernels); counters it lacks are not
    compared. None: all of COUNTERS exist.
    Nodes that took part in no connection of the model (routers) are skipped."""
    ends = {_norm(a) for conn in connections for sub in conn.subflows for a in sub.tuple4[::2]}
    out: list[CounterAgreement] = []
    for node in sorted(captures):
        if node not in addresses or not ends & {_norm(a) for a in addresses[node]}:
            continue  # no connection of the model ends at this node (a router): nothing to read
        view = _NodeView(node, addresses[node], connections)
        for pcap, p in merged_packets(captures[node]):
            view.feed(Where(pcap, p.frame, p.time), p)
        view.finish()
        if view.involved:
            names = available.get(node) if isinstance(available, Mapping) else available
            out += _Judge(node, view, counters.get(node, {}), names).all()
    return out


def node_captures(pcaps: Mapping[str, Path | str],
                  interfaces: Iterable[tuple[str, str]]) -> dict[str, list[Path | str]]:
    """node -> its own interfaces' captures, from TransferRun.pcaps (interface -> file) and
    MptcpTopo.interfaces() ((node, interface) pairs)."""
    out: dict[str, list[Path | str]] = {}
    for node, intf in interfaces:
        if intf in pcaps:
            out.setdefault(node, []).append(pcaps[intf])
    return out


def disagreements(agreements: Iterable[CounterAgreement]) -> list[CounterAgreement]:
    return [a for a in agreements if not a.agree]
