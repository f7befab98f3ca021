"""The NFQUEUE helper of the middleboxes no netfilter target can be: ISN rewriting and
resegmentation. It runs in the router's namespace and gets every queued segment whole
(NFQNL_COPY_PACKET); scapy changes it and the verdict hands the changed bytes back.

    rewrite-seq <offset>   a firewall randomising ISNs: the client's sequence numbers go up by
                           `offset` (0: a random offset per subflow), the server's ACKs and SACK
                           blocks come down by the same; both directions must be queued.
    alg <bytes>            an ALG rewriting a string to a shorter one: `bytes` bytes cut from
                           byte --at of the client's --nth data segment, the sequence numbers
                           after it shifted both ways so that TCP goes on (DSS left as it was).
    coalesce <limit>       a coalescing middlebox: a data segment waits briefly for the next of
                           its flow and leaves merged with it if both fit in `limit` bytes, with
                           the first one's options only (verdicts given late; the second dropped).
    resegment <size>       a resegmenting middlebox: a data segment longer than `size` bytes
                           leaves as several of at most `size`, each with the original's options
                           (as segmentation offload copies them); the first goes on with the
                           verdict, the rest are sent after it through a raw socket.

Stats (segments seen, changed, added; the offsets used) go to `--stats` as JSON when it stops
(SIGTERM, or end of stdin). Connections are told apart by the SYN: its sender is the client.

    python -m conformance.middlebox.rewriter --queue Q --stats FILE rewrite-seq 0   (in the router's netns)
"""

from __future__ import annotations

import argparse
import json
import random
import select
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from conformance.net.delayline import (
    NF_ACCEPT,
    NF_DROP,
    NFQA_CFG_CMD,
    NFQA_CFG_PARAMS,
    NFQA_CFG_QUEUE_MAXLEN,
    NFQA_PACKET_HDR,
    NFQA_VERDICT_HDR,
    NFQNL_CFG_CMD_BIND,
    NFQNL_MSG_VERDICT,
    NfQueue,
    _attr,
    _message,
)

NFQA_PAYLOAD = 10
NFQNL_COPY_PACKET = 2
NLM_F_REQUEST = 1
_NLMSG = struct.Struct("=IHHII")
_PACKET = (3 << 8) | 0  # NFNL_SUBSYS_QUEUE, NFQNL_MSG_PACKET
SEQ = 0xFFFFFFFF


class CopyQueue(NfQueue):
    """An NfQueue that asks for whole packets and can give back changed ones."""

    def bind_copy(self, queue: int, limit: int = 1024) -> None:
        self._request(queue, _attr(NFQA_CFG_CMD, struct.pack("=BxH", NFQNL_CFG_CMD_BIND, 0)))
        self._request(queue, _attr(NFQA_CFG_PARAMS, struct.pack(">IB", 0xFFFF, NFQNL_COPY_PACKET))
                      + _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack(">I", limit)))

    def read(self, timeout: float | None = None) -> list[tuple[int, int, bytes]]:
        """(queue, packet id, packet bytes) of every packet message waiting (waits for the first
        up to `timeout` seconds; None: for ever)."""
        if not select.select([self.sock], [], [], timeout)[0]:
            return []
        out = []
        while True:
            try:
                data = self.sock.recv(1 << 17)
            except BlockingIOError:
                return out
            off = 0
            while off + _NLMSG.size <= len(data):
                length, kind = _NLMSG.unpack_from(data, off)[:2]
                if length < _NLMSG.size:
                    break
                if kind == _PACKET:
                    queue = data[off + 18] << 8 | data[off + 19]
                    pid, payload = None, None
                    a, end = off + 20, off + length
                    while a + 4 <= end:
                        alen, atype = struct.unpack_from("=HH", data, a)
                        atype &= 0x3FFF
                        if atype == NFQA_PACKET_HDR:
                            pid = int.from_bytes(data[a + 4:a + 8], "big")
                        elif atype == NFQA_PAYLOAD:
                            payload = data[a + 4:a + alen]
                        if alen < 4:
                            break
                        a += (alen + 3) & ~3
                    if pid is not None and payload is not None:
                        out.append((queue, pid, payload))
                off += (length + 3) & ~3

    def verdict(self, queue: int, packet_id: int, payload: bytes | None = None, *, drop: bool = False) -> None:
        attrs = _attr(NFQA_VERDICT_HDR, struct.pack(">II", NF_DROP if drop else NF_ACCEPT, packet_id))
        if payload is not None:
            attrs += _attr(NFQA_PAYLOAD, payload)
        while True:
            try:
                self.sock.send(_message(NFQNL_MSG_VERDICT, queue, attrs, NLM_F_REQUEST, 0))
                return
            except BlockingIOError:
                select.select([], [self.sock], [], 0.01)


def _recompute(pkt, tcp) -> None:
    """Have scapy work out the lengths and checksums of a changed packet again."""
    del tcp.chksum
    if hasattr(pkt, "len"):  # IPv4
        del pkt.len
        del pkt.chksum
    else:
        del pkt.plen


@dataclass
class _Cut:
    """An ALG's shortening of one client flow, in the client's sequence space relative to its SYN."""

    isn: int
    starts: set[int] = field(default_factory=set)  # data segments seen (relative starts)
    point: int | None = None  # where `size` bytes were taken out


class Rewriter:
    def __init__(self, action: str, value: int, seed: int = 8684, nth: int = 5, at: int = 10) -> None:
        self.action, self.value, self.nth, self.at = action, value, nth, at
        self.rng = random.Random(seed)
        self.offsets: dict[tuple, int] = {}  # client->server 4-tuple -> offset
        self.cuts: dict[tuple, _Cut] = {}  # client->server 4-tuple -> the ALG's change
        self.stats = {"action": action, "value": value, "seen": 0, "changed": 0, "added": 0, "flows": []}

    def handle(self, raw: bytes) -> list[bytes] | None:
        """The packets to send for `raw`: None to let it go unchanged, else [first, *added]."""
        from scapy.layers.inet import IP, TCP
        from scapy.layers.inet6 import IPv6

        self.stats["seen"] += 1
        pkt = IP(raw) if raw[0] >> 4 == 4 else IPv6(raw)
        if TCP not in pkt:
            return None
        tcp = pkt[TCP]
        out = {"rewrite-seq": self._seq, "resegment": self._split, "alg": self._alg}[self.action](pkt, tcp)
        if out is not None:
            self.stats["changed"] += 1
            self.stats["added"] += len(out) - 1
        return out

    def _seq(self, pkt, tcp) -> list[bytes] | None:
        key = (pkt.src, tcp.sport, pkt.dst, tcp.dport)
        back = (pkt.dst, tcp.dport, pkt.src, tcp.sport)
        flags = int(tcp.flags)
        if flags & 0x02 and not flags & 0x10 and key not in self.offsets:  # a new subflow's SYN
            offset = self.value or self.rng.randrange(1 << 20, 1 << 31)
            self.offsets[key] = offset
            self.stats["flows"].append({"client": f"{pkt.src}:{tcp.sport}", "server": f"{pkt.dst}:{tcp.dport}",
                                        "offset": offset})
        if key in self.offsets:  # client -> server: sequence numbers up
            tcp.seq = (tcp.seq + self.offsets[key]) & SEQ
        elif back in self.offsets:  # server -> client: what it acknowledges down
            offset = self.offsets[back]
            if flags & 0x10:
                tcp.ack = (tcp.ack - offset) & SEQ
            tcp.options = [(name, tuple((v - offset) & SEQ for v in value)) if name == "SAck" else (name, value)
                           for name, value in tcp.options]
        else:
            return None
        del tcp.chksum
        return [bytes(pkt)]

    def _alg(self, pkt, tcp) -> list[bytes] | None:
        """An ALG that rewrites a string to a shorter one: `value` bytes go from byte `at` of the
        client's `nth` data segment (and from its retransmissions); the client's later sequence
        numbers come down by as much, the server's ACKs and SACK blocks go up (like conntrack's
        helpers do). The DSS options are left as they were."""
        key = (pkt.src, tcp.sport, pkt.dst, tcp.dport)
        back = (pkt.dst, tcp.dport, pkt.src, tcp.sport)
        flags, cut_len = int(tcp.flags), self.value
        if flags & 0x02 and not flags & 0x10:
            self.cuts.setdefault(key, _Cut(tcp.seq))
            return None
        if key in self.cuts:
            cut = self.cuts[key]
            data = bytes(tcp.payload)
            a = (tcp.seq - cut.isn) & SEQ
            b = a + len(data) + (1 if flags & 0x01 else 0)
            if cut.point is None and data and a not in cut.starts:
                cut.starts.add(a)
                if len(cut.starts) == self.nth and len(data) >= self.at + cut_len:
                    cut.point = a + self.at
                    self.stats["flows"].append({"client": f"{pkt.src}:{tcp.sport}",
                                                "server": f"{pkt.dst}:{tcp.dport}", "cut_at": cut.point,
                                                "bytes": cut_len})
            if cut.point is None or b <= cut.point:
                return None
            p, q = cut.point, cut.point + cut_len
            keep = data[:max(0, p - a)] + data[max(0, q - a):]
            tcp.remove_payload()
            tcp.add_payload(keep)
            tcp.seq = (cut.isn + (a if a <= p else max(p, a - cut_len))) & SEQ
        elif back in self.cuts and self.cuts[back].point is not None:
            cut = self.cuts[back]

            def up(v: int) -> int:
                rel = (v - cut.isn) & SEQ
                return (v + cut_len) & SEQ if rel > cut.point else v

            if flags & 0x10:
                tcp.ack = up(tcp.ack)
            tcp.options = [(n, tuple(up(x) for x in v)) if n == "SAck" else (n, v) for n, v in tcp.options]
        else:
            return None
        _recompute(pkt, tcp)
        return [bytes(pkt)]

    def _split(self, pkt, tcp) -> list[bytes] | None:
        data = bytes(tcp.payload)
        if len(data) <= self.value:
            return None
        out = []
        for start in range(0, len(data), self.value):
            piece = pkt.copy()
            ptcp = piece.getlayer(type(tcp))
            ptcp.remove_payload()
            ptcp.seq = (tcp.seq + start) & SEQ
            if start + self.value < len(data):
                ptcp.flags = int(tcp.flags) & ~0x09  # FIN and PSH only on the last piece
            ptcp.add_payload(data[start:start + self.value])
            _recompute(piece, ptcp)
            out.append(bytes(piece))
        return out


HOLD_S = 0.002  # how long a coalescer keeps a segment waiting for the next one


class Coalescer:
    """A coalescing middlebox (LRO, a proxy's buffering): a data segment waits up to HOLD_S for
    the next one of its flow; if that continues it and both fit in `limit` bytes, they leave as
    one segment with the first one's TCP options (the second's are lost, as such middleboxes lose
    them) and the later ACK. Verdicts are (packet id, new bytes or None, drop)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held: dict[tuple, tuple[int, object, float]] = {}  # flow -> (packet id, packet, since)
        self.stats = {"action": "coalesce", "value": limit, "seen": 0, "changed": 0, "added": 0, "flows": [],
                      "options_lost": 0}

    def arrive(self, pid: int, raw: bytes, now: float) -> list[tuple[int, bytes | None, bool]]:
        from scapy.layers.inet import IP, TCP
        from scapy.layers.inet6 import IPv6

        self.stats["seen"] += 1
        pkt = IP(raw) if raw[0] >> 4 == 4 else IPv6(raw)
        if TCP not in pkt:
            return [(pid, None, False)]
        tcp = pkt[TCP]
        key = (pkt.src, tcp.sport, pkt.dst, tcp.dport)
        size = len(tcp.payload)
        plain = size and not int(tcp.flags) & 0x07  # data, no SYN, FIN or RST
        out = []
        held = self.held.pop(key, None)
        if held is not None:
            hpid, hpkt, _ = held
            htcp = hpkt[TCP]
            follows = tcp.seq == (htcp.seq + len(htcp.payload)) & SEQ
            if plain and follows and len(htcp.payload) + size <= self.limit:
                if tcp.options != htcp.options:
                    self.stats["options_lost"] += 1
                merged = bytes(htcp.payload) + bytes(tcp.payload)
                htcp.remove_payload()
                htcp.add_payload(merged)
                htcp.ack, htcp.flags = tcp.ack, int(htcp.flags) | (int(tcp.flags) & 0x08)
                _recompute(hpkt, htcp)
                self.stats["changed"] += 1
                return [(hpid, bytes(hpkt), False), (pid, None, True)]
            out.append((hpid, None, False))
        if plain and size < self.limit:
            self.held[key] = (pid, pkt, now)
        else:
            out.append((pid, None, False))
        return out

    def due(self, now: float) -> list[tuple[int, bytes | None, bool]]:
        """Segments that waited long enough: they go on unchanged."""
        late = [k for k, (_, _, since) in self.held.items() if now - since >= HOLD_S]
        return [(self.held.pop(k)[0], None, False) for k in late]


def _start(queue: int, stats: dict, path: Path) -> CopyQueue:
    """Scapy imported, the queue bound, `stats` written to `path` on SIGTERM; then ready. (A first
    scapy import takes about 0.4 s, which the first queued segment would otherwise wait: long
    enough for a join to be given up.)"""
    from scapy.layers.inet import IP, TCP  # noqa: F401
    from scapy.layers.inet6 import IPv6  # noqa: F401

    nfq = CopyQueue(rcvbuf=16 << 20)
    nfq.bind_copy(queue)

    def finish(*_) -> None:
        path.write_text(json.dumps(stats, indent=2))
        sys.exit(0)

    signal.signal(signal.SIGTERM, finish)
    print("ready", flush=True)
    return nfq


def serve_coalescer(queue: int, coalescer: Coalescer, stats: Path) -> None:
    nfq = _start(queue, coalescer.stats, stats)
    while True:
        packets = nfq.read(HOLD_S / 2 if coalescer.held else None)
        now = time.monotonic()
        verdicts = [v for q, pid, raw in packets for v in coalescer.arrive(pid, raw, now)]
        for pid, payload, drop in verdicts + coalescer.due(now):
            nfq.verdict(queue, pid, payload, drop=drop)


def serve(queue: int, rewriter: Rewriter, stats: Path) -> None:
    raw4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    raw6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
    nfq = _start(queue, rewriter.stats, stats)
    while True:
        for q, pid, raw in nfq.read():
            try:
                out = rewriter.handle(raw)
            except Exception as exc:  # a packet scapy cannot rebuild goes on unchanged, noted
                rewriter.stats.setdefault("errors", []).append(str(exc)[:200])
                out = None
            nfq.verdict(q, pid, out[0] if out else None)
            for extra in (out or [])[1:]:
                if extra[0] >> 4 == 4:
                    raw4.sendto(extra, (socket.inet_ntop(socket.AF_INET, extra[16:20]), 0))
                else:
                    raw6.sendto(extra, (socket.inet_ntop(socket.AF_INET6, extra[24:40]), 0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m conformance.middlebox.rewriter")
    ap.add_argument("--queue", type=int, required=True)
    ap.add_argument("--stats", type=Path, required=True)
    ap.add_argument("action", choices=("rewrite-seq", "resegment", "coalesce", "alg"))
    ap.add_argument("value", type=int)
    ap.add_argument("--nth", type=int, default=5, help="alg: the client's data segment it changes")
    ap.add_argument("--at", type=int, default=10, help="alg: the byte of that segment it cuts from")
    args = ap.parse_args(argv)
    if args.action == "coalesce":
        serve_coalescer(args.queue, Coalescer(args.value), args.stats)
        return 0
    serve(args.queue, Rewriter(args.action, args.value, nth=args.nth, at=args.at), args.stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
