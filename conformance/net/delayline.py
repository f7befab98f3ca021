"""A user-space delay line for kernels without netem: packets wait in NFQUEUE, in the kernel.

iptables hands each packet of a link direction to a netfilter queue (`-j NFQUEUE --queue-num N`).
The packet itself stays in the kernel: this helper asks only for its metadata (NFQNL_COPY_META,
about 100 bytes), notes when it arrived, and once the link's delay has passed gives the verdict
ACCEPT for it and every earlier packet of the queue with one NFQNL_MSG_VERDICT_BATCH message. So
packets never cross into user space, are released in arrival order, and the cost is one netlink
message in and (at most) one out per packet. With jitter each packet's release time is drawn
uniformly from delay ± jitter (netem's default distribution), but never before the previous
packet's: a delay line keeps the order (netem with jitter reorders).

Timing. The arrival time is the kernel's receive timestamp of the packet, which nfnetlink_queue
passes on (the helper keeps a SO_TIMESTAMPNS socket open, which makes the kernel stamp received
packets), not the moment this process got round to reading it; where there is no such stamp
(locally sent packets) or it predates an earlier delay line of this namespace, it is the read
time. The release: timer slack is 1 ns, and the loop asks to be woken early by its own wake-up
latency, learnt as it runs, so that packets leave on time on average rather than one wake-up late.
It runs SCHED_FIFO (lowest real-time priority) unless its own loop saturates a CPU, so that on a
loaded machine it is woken when due rather than when the scheduler gets round to it (see
Priority). It wakes once per release rather than once per packet (see serve). The garbage
collector is off (the loop makes no cycles). What remains is scheduling noise: `stats` reports
each line's release error (release time minus due time) as measured here.

The protocol (linux/netfilter/nfnetlink_queue.h) is spoken directly over an AF_NETLINK socket,
so there is nothing to compile and no extra dependency. One helper process runs per network
namespace and serves every delayed queue of that node. It is driven through its stdin, one
command a line, answering each on stdout:

    add <queue> <delay_ms> <jitter_ms> <limit> in|out <ifname>
                                        bind the queue of the packets arriving on (in) or leaving by
                                        (out) <ifname>  -> "ok <queue>" | "error <queue> <why>"
    stats                               -> "stats <json>" (per queue: packets, release error,
                                           the kernel's drop counters)

A full queue (`limit` packets waiting) drops, as netem's limit does. End of stdin (the owner
closed it, or died) lets every waiting packet through and exits; so does SIGTERM. The helper
enters the namespace itself (`--netns`), so it is one of the processes the namespace's removal
kills, and it names itself after the run prefix (`--name`, its comm).

    python conformance/net/delayline.py --netns mpc123-r1 --name mpc123-dl-r1   (standard library only)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import gc
import json
import os
import random
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG, NFQNL_MSG_VERDICT_BATCH = 0, 1, 2, 3
NFQA_PACKET_HDR, NFQA_VERDICT_HDR, NFQA_TIMESTAMP, NFQA_IFINDEX_INDEV = 1, 2, 4, 5
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQNL_CFG_CMD_BIND, NFQNL_CFG_CMD_UNBIND = 1, 2
NFQNL_COPY_META = 1
NFQA_CFG_F_GSO = 4  # hand GSO packets over whole: they are not segmented just to be queued
NF_DROP, NF_ACCEPT = 0, 1
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK = 1, 4
SOL_NETLINK, NETLINK_NO_ENOBUFS = 270, 5
PR_SET_NAME, PR_SET_TIMERSLACK = 15, 29
SO_TIMESTAMPNS = 35
MAX_STAMP_AGE_NS = 1_000_000_000
CLONE_NEWNET = 0x40000000

_NLMSG = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")  # family, version, res_id (big-endian on the wire)
_NLA = struct.Struct("=HH")
_PACKET = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET
# Attributes the kernel writes after NFQA_TIMESTAMP (payload, conntrack, uid/gid, cap_len, skb_info,
# secctx), in nfqnl_build_packet_message's order: reading one means there is no stamp to come.
_AFTER_STAMP = frozenset({10, 11, 12, 13, 14, 16, 17, 18})
QUEUE_BASE = 0x4D50  # "MP": our queue numbers, clear of a case's own NFQUEUE middleboxes
DEFAULT_LIMIT = 1000  # packets, netem's default limit


class NfqError(OSError):
    pass


def _attr(kind: int, payload: bytes) -> bytes:
    data = _NLA.pack(4 + len(payload), kind) + payload
    return data + b"\0" * (-len(data) % 4)


def _message(msg: int, queue: int, attrs: bytes, flags: int, seq: int) -> bytes:
    body = _NFGEN.pack(socket.AF_UNSPEC, 0, socket.htons(queue)) + attrs
    kind = (NFNL_SUBSYS_QUEUE << 8) | msg
    return _NLMSG.pack(_NLMSG.size + len(body), kind, flags, seq, 0) + body


class NfQueue:
    """One nfnetlink socket, bound to any number of queues of the current network namespace."""

    def __init__(self, rcvbuf: int = 8 << 20):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        try:  # root may go past rmem_max; messages are small, a burst must not overrun the buffer
            self.sock.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)  # SO_RCVBUFFORCE
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        self.sock.setblocking(False)
        self._seq = 0
        self._pending: list[tuple[int, int, int, int]] = []
        self.errors: list[int] = []  # errno of asynchronous NLMSG_ERRORs (verdicts are sent without ack)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def _request(self, queue: int, attrs: bytes) -> None:
        """A config request, acknowledged: raises NfqError with the kernel's errno on refusal.
        Packet messages arriving meanwhile (other queues may be busy) are kept for packets()."""
        self._seq += 1
        seq = self._seq
        self.sock.settimeout(5)
        try:
            self.sock.send(_message(NFQNL_MSG_CONFIG, queue, attrs, NLM_F_REQUEST | NLM_F_ACK, seq))
            while True:
                code = self._parse(self.sock.recv(65536), self._pending, seq)
                if code is not None:
                    if code:
                        raise NfqError(code, os.strerror(code))
                    return
        finally:
            self.sock.setblocking(False)

    def bind(self, queue: int, limit: int = DEFAULT_LIMIT) -> None:
        self._request(queue, _attr(NFQA_CFG_CMD, struct.pack("=BxH", NFQNL_CFG_CMD_BIND, 0)))
        self._request(queue, _attr(NFQA_CFG_PARAMS, struct.pack(">IB", 0, NFQNL_COPY_META))
                      + _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack(">I", limit))
                      + _attr(NFQA_CFG_FLAGS, struct.pack(">I", NFQA_CFG_F_GSO))
                      + _attr(NFQA_CFG_MASK, struct.pack(">I", NFQA_CFG_F_GSO)))

    def unbind(self, queue: int) -> None:
        self._request(queue, _attr(NFQA_CFG_CMD, struct.pack("=BxH", NFQNL_CFG_CMD_UNBIND, 0)))

    def verdict_upto(self, queue: int, packet_id: int, verdict: int = NF_ACCEPT) -> None:
        """`verdict` for packet `packet_id` of `queue` and every earlier one still waiting there."""
        attrs = _attr(NFQA_VERDICT_HDR, struct.pack(">II", verdict, packet_id))
        while True:
            try:
                self.sock.send(_message(NFQNL_MSG_VERDICT_BATCH, queue, attrs, NLM_F_REQUEST, 0))
                return
            except BlockingIOError:  # the send buffer is full for a moment: wait for room
                select.select([], [self.sock], [], 0.01)

    def packets(self) -> list[tuple[int, int, int, int]]:
        """(queue, packet id, kernel timestamp in ns or 0, input interface index or 0) of every
        packet message waiting on the socket (never blocks). The kernel gives a timestamp
        (CLOCK_REALTIME) at PREROUTING and FORWARD only: when the packet was received, or when it
        was queued if it carries no receive stamp."""
        out, self._pending = self._pending, []
        recv = self.sock.recv
        while True:
            try:
                data = recv(65536)
            except BlockingIOError:
                return out
            self._parse(data, out)

    def _parse(self, data: bytes, out: list, seq: int | None = None) -> int | None:
        """Packet messages of `data` go to `out`; returns the errno (0: acknowledged) of the answer
        to request `seq` if `data` holds it. Other errors are kept in self.errors."""
        answer = None
        off = 0
        while off + _NLMSG.size <= len(data):
            length, kind, _, mseq, _ = _NLMSG.unpack_from(data, off)
            if length < _NLMSG.size:
                break
            if kind == _PACKET and off + _NLMSG.size + _NFGEN.size <= len(data):
                queue = data[off + 18] << 8 | data[off + 19]
                packet_id = stamp = indev = None
                a, end = off + _NLMSG.size + _NFGEN.size, min(off + length, len(data))
                while a + 4 <= end:  # attributes, read byte-wise: this loop runs for every packet
                    alen = data[a] | data[a + 1] << 8
                    atype = (data[a + 2] | data[a + 3] << 8) & 0x3FFF
                    if atype == NFQA_PACKET_HDR:
                        packet_id = int.from_bytes(data[a + 4:a + 8], "big")
                    elif atype == NFQA_IFINDEX_INDEV:
                        indev = int.from_bytes(data[a + 4:a + 8], "big")
                    elif atype == NFQA_TIMESTAMP:
                        stamp = (int.from_bytes(data[a + 4:a + 12], "big") * 1_000_000_000
                                 + int.from_bytes(data[a + 12:a + 20], "big") * 1000)
                        break  # the kernel puts nothing we read after the stamp
                    elif atype in _AFTER_STAMP:
                        break
                    if alen < 4:
                        break
                    a += (alen + 3) & ~3
                if packet_id is not None:
                    out.append((queue, packet_id, stamp or 0, indev or 0))
            elif kind == NLMSG_ERROR:
                code = -struct.unpack_from("=i", data, off + _NLMSG.size)[0]
                if seq is not None and mseq == seq:
                    answer = code
                elif code:
                    self.errors.append(code)
            off += (length + 3) & ~3
        return answer


class Line:
    """One delayed direction: a FIFO of (due time, packet id), and what it measured."""

    def __init__(self, queue: int, delay_ms: float, jitter_ms: float, limit: int, hook: str = "in",
                 ifindex: int = 0):
        self.queue, self.limit, self.hook, self.ifindex = queue, limit, hook, ifindex
        self.delay_ns, self.jitter_ns = int(delay_ms * 1e6), int(jitter_ms * 1e6)
        self.waiting: collections.deque[tuple[int, int]] = collections.deque()
        self.last_due = 0
        self.packets = 0
        self.stamped = 0  # packets whose arrival time came from the kernel
        self.most_waiting = 0
        self.error_ns: list[int] = []  # release time minus due time, per packet (a bounded sample)
        self._seen = 0

    def arrive(self, packet_id: int, arrived: int) -> None:
        due = arrived + self.delay_ns
        if self.jitter_ns:
            due += random.randint(-self.jitter_ns, self.jitter_ns)
        due = max(due, self.last_due)  # never overtake the packet ahead
        self.last_due = due
        self.waiting.append((due, packet_id))
        self.packets += 1
        if len(self.waiting) > self.most_waiting:
            self.most_waiting = len(self.waiting)

    def next_due(self) -> int | None:
        return self.waiting[0][0] if self.waiting else None

    def release(self, upto: int, now: int) -> int | None:
        """Pop every packet due by `upto`; the last one's id (one batch verdict releases them all)."""
        last = None
        waiting = self.waiting
        while waiting and waiting[0][0] <= upto:
            due, last = waiting.popleft()
            self._note(now - due)
        return last

    def _note(self, error: int) -> None:
        self._seen += 1
        if len(self.error_ns) < SAMPLE:
            self.error_ns.append(error)
        else:  # a uniform sample of the whole run (reservoir)
            slot = random.randrange(self._seen)
            if slot < SAMPLE:
                self.error_ns[slot] = error

    def stats(self) -> dict:
        err = sorted(self.error_ns)

        def pick(q: float) -> float | None:
            return err[min(len(err) - 1, int(q * len(err)))] / 1e6 if err else None

        return {"queue": self.queue, "hook": self.hook, "delay_ms": self.delay_ns / 1e6,
                "jitter_ms": self.jitter_ns / 1e6, "limit": self.limit, "packets": self.packets,
                "kernel_stamped": self.stamped,
                "waiting": len(self.waiting), "most_waiting": self.most_waiting,
                "release_error_ms": {"mean": sum(err) / len(err) / 1e6 if err else None, "p1": pick(0.01),
                                     "p50": pick(0.5), "p99": pick(0.99)}}


class Waker:
    """How late select() wakes this process, learnt as it runs: the loop then asks to be woken that
    much early, so packets leave on time on average instead of one wake-up latency late."""

    CAP_NS = 1_000_000

    def __init__(self) -> None:
        self.advance = 0

    def woke(self, asked: int, now: int) -> None:
        late = min(max(now - asked, 0), self.CAP_NS)
        self.advance += (late - self.advance) // 16  # EWMA, 1/16


SAMPLE = 100_000
QUANTUM_NS = 100_000  # packets due within 0.1 ms after a wake-up leave with it (one verdict)
WATCH_NS = 1_000_000  # with a release due sooner than this, arrivals wait in the socket to be read


class Priority:
    """Real-time scheduling (SCHED_FIFO, lowest priority) while the loop is not saturated: on a busy
    machine a normal process waits milliseconds for a CPU, a real-time one is woken at once. If the
    loop's own work (user time) takes more than 60 % of a CPU it goes back to normal scheduling, and
    returns below 40 %. (Its system time is mostly the network's: a verdict carries the packet on
    through the next hops inside the verdict call, work the kernel would otherwise do in softirq
    context; the kernel's real-time throttling bounds it all at 95 % of a CPU in any case.)"""

    PERIOD_NS = 500_000_000

    def __init__(self) -> None:
        self.realtime = self._set(True)
        self.allowed = self.realtime  # not root, or no real-time budget: stay normal
        self._wall, self._user = time.monotonic_ns(), os.times().user
        self.demotions = 0

    @staticmethod
    def _set(realtime: bool) -> bool:
        try:
            if realtime:
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
            else:
                os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        except OSError:
            return not realtime
        return realtime

    def check(self, now: int) -> None:
        if not self.allowed or now - self._wall < self.PERIOD_NS:
            return
        user = os.times().user
        share = (user - self._user) * 1e9 / (now - self._wall)
        self._wall, self._user = now, user
        if self.realtime and share > 0.6:
            self.realtime = self._set(False)
            self.demotions += 1
        elif not self.realtime and share < 0.4:
            self.realtime = self._set(True)


def _enter_netns(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _tune_process(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    libc.prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)  # wake at the due time, not up to 50 us after it


def _netstamp_switch() -> socket.socket:
    """A socket asking for receive timestamps: while one exists, the kernel stamps every received
    packet (the switch tcpdump and ping flip too), and nfnetlink_queue passes the stamp on. Arrival
    times then come from the kernel, not from when this process got round to reading them."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    return sock


def serve(nfq: NfQueue, control, reply) -> None:
    """The event loop: packets in, verdicts out when due, commands from `control`.

    It wakes up when a packet is due (releasing, with it, those due within the next QUANTUM_NS)
    and, while nothing is due within WATCH_NS, when a packet arrives. Under steady traffic it
    therefore wakes once per release, not once per packet in and once out: arrivals wait in the
    socket with their kernel timestamps and are read at the next wake-up."""
    lines: dict[int, Line] = {}
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the owner's to handle, then it closes stdin
    wake_r, wake_w = os.pipe()  # a signal wakes select() up through this pipe
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    buffered = b""
    control_fd = control.fileno()
    os.set_blocking(control_fd, False)
    clock, wall = time.monotonic_ns, time.time_ns
    waker = Waker()
    priority = Priority()

    def take(batch: list, read: int, unstamped: int) -> None:
        """Put arrivals on their lines: at their kernel timestamp if they have a usable one, else
        at `unstamped`."""
        offset = wall() - read  # CLOCK_REALTIME - CLOCK_MONOTONIC, for the kernel's stamps
        held_here = {line.ifindex for line in lines.values() if line.hook == "in"}
        for queue, packet_id, stamp, indev in batch:
            line = lines.get(queue)
            if line is None:  # not ours to hold (cannot happen: only bound queues deliver)
                nfq.verdict_upto(queue, packet_id)
                continue
            # A packet leaving by a delayed interface after arriving by another one carries the
            # stamp of its arrival, from before the first delay: it reached this line when we
            # released it from the other, inside our own verdict call.
            arrived = stamp - offset if stamp and not (line.hook == "out" and indev in held_here) else 0
            if read - MAX_STAMP_AGE_NS <= arrived <= read:
                line.stamped += 1
            else:  # no (usable) stamp, or a realtime clock step
                arrived = unstamped
            line.arrive(packet_id, arrived)

    while not stopping:
        now = clock()
        due = [d for d in (line.next_due() for line in lines.values()) if d is not None]
        if due:
            wake_at = min(due) - waker.advance
            timeout = max(0.0, (wake_at - now) / 1e9)
            watch = [control_fd, wake_r, nfq] if wake_at - now > WATCH_NS else [control_fd, wake_r]
        else:
            wake_at, timeout, watch = None, None, [control_fd, wake_r, nfq]
        try:
            readable, _, _ = select.select(watch, [], [], timeout)
        except InterruptedError:
            continue
        if wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 64)
        if not readable and wake_at is not None:
            waker.woke(wake_at, clock())
        batch = nfq.packets()
        if batch:
            read = clock()
            take(batch, read, read)
        if control_fd in readable:
            try:
                chunk = os.read(control_fd, 4096)
            except BlockingIOError:  # woken for nothing
                chunk = None
            if chunk == b"":  # end of stdin: the owner is done (or gone)
                break
            buffered += chunk or b""
            while b"\n" in buffered:
                text, buffered = buffered.split(b"\n", 1)
                reply(_command(nfq, lines, waker, priority, text.decode().split()))
        now = clock()
        released = False
        for line in lines.values():
            last = line.release(now + waker.advance + QUANTUM_NS, now)
            if last is not None:
                nfq.verdict_upto(line.queue, last)
                released = True
        if released:
            # What our verdicts just let through to another line of this namespace (or what the
            # router answered to it) is in the socket already: it arrived now.
            sent = clock()
            batch = nfq.packets()
            if batch:
                take(batch, clock(), sent)
        priority.check(now)
    for line in lines.values():  # let what is still on the line through, then let go of the queue
        if line.waiting:
            nfq.verdict_upto(line.queue, line.waiting[-1][1])
        with contextlib.suppress(OSError):
            nfq.unbind(line.queue)


def kernel_queue_stats() -> dict[int, dict]:
    """The kernel's own counters of this namespace's queues: packets dropped because the queue was
    full (`queue_dropped`, the link's limit) or could not be handed to us (`user_dropped`)."""
    out = {}
    try:
        with open("/proc/net/netfilter/nfnetlink_queue") as f:
            text = f.read()
    except OSError:
        return out
    for row in text.splitlines():
        f = row.split()
        if len(f) >= 7:
            out[int(f[0])] = {"kernel_waiting": int(f[2]), "queue_dropped": int(f[5]), "user_dropped": int(f[6])}
    return out


def _command(nfq: NfQueue, lines: dict[int, Line], waker: Waker, priority: Priority | None,
             words: list[str]) -> str:
    if not words:
        return "error - empty command"
    if words[0] == "add" and len(words) == 7 and words[5] in ("in", "out"):
        try:
            queue, delay, jitter, limit = int(words[1]), float(words[2]), float(words[3]), int(words[4])
        except ValueError:
            return f"error {words[1]} bad numbers in {' '.join(words)!r}"
        if queue in lines:
            return f"error {queue} queue already bound"
        try:
            ifindex = socket.if_nametoindex(words[6])
            nfq.bind(queue, limit)
        except OSError as exc:
            return f"error {queue} cannot bind queue for {words[6]}: {exc.strerror or exc}"
        lines[queue] = Line(queue, delay, jitter, limit, words[5], ifindex)
        return f"ok {queue}"
    if words[0] == "stats":
        kernel = kernel_queue_stats()
        out = []
        for line in lines.values():
            st = line.stats()
            st.update(kernel.get(line.queue, {}))
            out.append(st)
        return "stats " + json.dumps({
            "lines": out, "wake_advance_ms": waker.advance / 1e6, "netlink_errors": nfq.errors[-10:],
            "realtime": priority.realtime if priority else None,
            "realtime_demotions": priority.demotions if priority else None})
    return f"error - unknown command {' '.join(words)!r}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="NFQUEUE delay line (one per network namespace)")
    parser.add_argument("--netns", help="named network namespace to serve (default: the current one)")
    parser.add_argument("--name", default="delayline", help="process name (carries the run prefix)")
    args = parser.parse_args(argv)
    if args.netns:
        _enter_netns(args.netns)
    _tune_process(args.name)
    nfq = NfQueue()
    switch = _netstamp_switch()
    gc.disable()  # the loop makes no reference cycles; a collection pause would delay packets

    def reply(text: str) -> None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    reply("ready")
    try:
        serve(nfq, sys.stdin, reply)
    finally:
        nfq.close()
        switch.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
