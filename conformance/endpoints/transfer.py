"""A bulk-transfer endpoint over IPPROTO_MPTCP (or plain TCP), standard library only.

Run inside a topology host as `python -m conformance.endpoints.transfer server|client ...`.
Each side sends a deterministic pseudo-random stream of --send bytes (seeded by its role, so the
peer knows what to expect), half-closes, reads the peer's stream to EOF, checks its SHA-256, and
writes a JSON report with what the kernel says about the connection: MPTCP_INFO, the subflow
addresses, and whether the socket fell back to TCP. Exit 0 only when every byte matched.

With --abort-after N the side stops reading once N bytes have arrived and closes with SO_LINGER 0
while the peer is still sending: the abortive close that makes the kernel send MP_FASTCLOSE
(RFC 8684 §3.5) and MP_TCPRST (§3.6). Exit 0 then means the bytes it did read were the right ones."""

from __future__ import annotations

import argparse
import ctypes
import errno
import hashlib
import json
import random
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

IPPROTO_MPTCP = 262
SOL_MPTCP = 284
MPTCP_INFO = 1
MPTCP_SUBFLOW_ADDRS = 3
TCP_IS_MPTCP = 43
SEEDS = {"client": 1, "server": 2}
FIRST_CHUNK = 1000
BLOCK = 1 << 20

_INFO_FMT = "=6B2xIIQQQ3BxIQQQQB3xIII"
_INFO_FIELDS = ("subflows", "add_addr_signal", "add_addr_accepted", "subflows_max", "add_addr_signal_max",
                "add_addr_accepted_max", "flags", "token", "write_seq", "snd_una", "rcv_nxt",
                "local_addr_used", "local_addr_max", "csum_enabled", "retransmits", "bytes_retrans",
                "bytes_sent", "bytes_received", "bytes_acked", "subflows_total", "last_data_sent",
                "last_data_recv", "last_ack_recv")
_SOCKADDR_SIZE = 128
_libc = ctypes.CDLL(None, use_errno=True)


def stream(role: str, size: int) -> Iterator[bytes]:
    """The bytes `role` sends, in blocks: reproducible by the peer from the role and size alone,
    and never held in memory whole (transfers may be larger than a Python int of bits allows)."""
    rng, left = random.Random(SEEDS[role]), size
    while left > 0:
        n = min(BLOCK, left)
        yield rng.randbytes(n)
        left -= n


class Expected:
    """The peer's stream as it should arrive, compared chunk by chunk as it does: the offset of
    the first byte that differs (a hash says only that something did)."""

    def __init__(self, role: str, size: int, keep: int = 0) -> None:
        self.blocks, self.block, self.pos = stream(role, size), b"", 0
        # What arrived, kept (up to `keep` bytes) so that a stream that went wrong can be saved
        # whole: where each piece really belongs is the evidence of how it went wrong.
        self.keep, self.received = keep, bytearray()
        self.offset = 0  # bytes compared and equal so far
        self.first_difference: int | None = None
        self.sample = b""  # received bytes from the first difference on (where they came from is evidence)

    def compare(self, chunk: bytes) -> None:
        if len(self.received) < self.keep:
            self.received += chunk[:self.keep - len(self.received)]
        if self.first_difference is not None:
            return
        i = 0
        while i < len(chunk):
            if self.pos >= len(self.block):
                self.block, self.pos = next(self.blocks, b""), 0
                if not self.block:  # more bytes than the peer sends
                    self.first_difference = self.offset + i
                    return
            n = min(len(chunk) - i, len(self.block) - self.pos)
            if chunk[i:i + n] != self.block[self.pos:self.pos + n]:
                j = next(k for k in range(n) if chunk[i + k] != self.block[self.pos + k])
                self.first_difference = self.offset + i + j
                self.sample = chunk[i + j:i + j + 32]
                return
            i, self.pos = i + n, self.pos + n
        self.offset += len(chunk)


def _save(path: Path | None, expected: Expected) -> str | None:
    """The received stream written to `path` if it went wrong (and was kept); the path or None."""
    if path is None or expected.first_difference is None or not expected.received:
        return None
    path.write_bytes(expected.received)
    return str(path)


def digest(role: str, size: int, prefix: int | None = None) -> str:
    """SHA-256 of the first `prefix` bytes (default: all) of what `role` sends when sending `size`."""
    h, want = hashlib.sha256(), size if prefix is None else prefix
    for block in stream(role, size):
        if want <= 0:
            break
        h.update(block[:want])
        want -= len(block)
    return h.hexdigest()


def mptcp_info(sock: socket.socket) -> dict | None:
    """MPTCP_INFO as a dict, or None when the socket is not (or no longer) MPTCP."""
    size = struct.calcsize(_INFO_FMT)
    try:
        raw = sock.getsockopt(SOL_MPTCP, MPTCP_INFO, size)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOPROTOOPT, errno.EINVAL):
            return None
        raise
    return decode_info(raw)


def decode_info(raw: bytes) -> dict:
    """struct mptcp_info as a dict; an older kernel's shorter struct reads its missing fields as 0."""
    size = struct.calcsize(_INFO_FMT)
    info = dict(zip(_INFO_FIELDS, struct.unpack(_INFO_FMT, raw[:size].ljust(size, b"\0")), strict=True))
    info["token"] = f"{info['token']:08x}"
    return info


def _sockaddr(raw: bytes) -> dict:
    family, port = struct.unpack_from("=H", raw)[0], struct.unpack_from("!H", raw, 2)[0]
    if family == socket.AF_INET:
        return {"addr": socket.inet_ntop(socket.AF_INET, raw[4:8]), "port": port}
    if family == socket.AF_INET6:
        return {"addr": socket.inet_ntop(socket.AF_INET6, raw[8:24]), "port": port}
    return {"family": family}


def subflow_addrs(sock: socket.socket, most: int = 16) -> list[dict] | None:
    """The (local, remote) address of every subflow, from MPTCP_SUBFLOW_ADDRS."""
    # The request header is input as well as output, which socket.getsockopt cannot express.
    buf = ctypes.create_string_buffer(struct.pack("=IIII", 16, 0, 0, 2 * _SOCKADDR_SIZE),
                                      16 + most * 2 * _SOCKADDR_SIZE)
    size = ctypes.c_uint32(len(buf))
    if _libc.getsockopt(sock.fileno(), SOL_MPTCP, MPTCP_SUBFLOW_ADDRS, buf, ctypes.byref(size)) != 0:
        return None
    raw = buf.raw[:size.value]
    _, count, _, size_user = struct.unpack_from("=IIII", raw)
    out = []
    for i in range(min(count, most)):
        base = 16 + i * size_user
        out.append({"local": _sockaddr(raw[base:base + _SOCKADDR_SIZE]),
                    "remote": _sockaddr(raw[base + _SOCKADDR_SIZE:base + 2 * _SOCKADDR_SIZE])})
    return out


def is_mptcp(sock: socket.socket) -> bool | None:
    try:
        return bool(sock.getsockopt(socket.IPPROTO_TCP, TCP_IS_MPTCP))
    except OSError:
        return None


def _total_subflows(info: dict | None) -> int:
    if not info:
        return 1
    return info["subflows_total"] or info["subflows"] + 1


def abort(sock: socket.socket) -> None:
    """Close abortively: linger on with a zero timeout. An MPTCP socket closed this way (with unread
    data, too) is torn down with MP_FASTCLOSE instead of DATA_FIN, and its subflows are reset."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class Stopped(Exception):
    """The harness ended this endpoint (SIGTERM) before its exchange was over."""


def _stop_on_sigterm() -> None:
    # The harness stops an endpoint whose connection it has seen die (e.g. a listener whose only
    # subflow was reset keeps waiting for more): the report of what got through must still be
    # written, so the first SIGTERM ends the exchange, not the process.
    def handler(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Stopped("stopped by the harness (SIGTERM)")
    signal.signal(signal.SIGTERM, handler)


def exchange(sock: socket.socket, role: str, send: int, expect: int, wait_subflows: int,
             wait_timeout: float, abort_after: int | None = None, send_delay: float = 0.0,
             deadline: float | None = None, save_mismatch: Path | None = None) -> dict:
    """Send and receive at once; `deadline` (time.monotonic()) bounds the whole exchange: a
    connection the kernel stalls, or that trickles, still ends in a report of what got through."""
    peer_role = "server" if role == "client" else "client"
    report: dict = {"role": role, "bytes_to_send": send, "bytes_expected": expect}
    t0 = time.monotonic()
    sent = hashlib.sha256()
    send_error: list[str] = []

    def wait_for_subflows() -> None:
        # The path manager opens subflows only once the connection is fully established, i.e.
        # after the first data (MP_CAPABLE with data, or a DSS) has flowed: so a first small chunk
        # goes out before we hold the rest back for the subflows (on fast veth links the transfer
        # would otherwise be over before any join).
        deadline = time.monotonic() + wait_timeout
        while _total_subflows(mptcp_info(sock)) < wait_subflows and time.monotonic() < deadline:
            time.sleep(0.01)
        report["subflows_before_bulk"] = _total_subflows(mptcp_info(sock))
        report["waited_for_subflows_s"] = round(time.monotonic() - t0, 3)

    def sender() -> None:
        try:
            # Holding back (data and DATA_FIN) lets the peer's first data segment go out before
            # anything from this side, e.g. a client's MP_CAPABLE with data (RFC 8684 §3.1).
            time.sleep(send_delay)
            blocks = stream(role, send)
            head = next(blocks, b"")
            first = min(len(head), FIRST_CHUNK) if wait_subflows > 1 else len(head)
            sent.update(head)
            sock.sendall(head[:first])
            if wait_subflows > 1:
                wait_for_subflows()
            sock.sendall(head[first:])
            for block in blocks:
                sent.update(block)
                sock.sendall(block)
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            send_error.append(str(exc))
        finally:
            finished.set()

    # Not Thread.is_alive(): a join interrupted by SIGTERM (Stopped) marks a still-running thread
    # as finished (CPython 3.11), and a stopped sender would be reported as done.
    finished = threading.Event()
    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    received, h = 0, hashlib.sha256()
    expected = Expected(peer_role, expect, keep=expect if save_mismatch else 0)
    peak_info = None
    receive_error = None
    try:
        while True:
            if deadline is not None:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                chunk = sock.recv(1 << 16)
            except TimeoutError as exc:
                receive_error = f"{type(exc).__name__}: {exc}"
                break
            if not chunk:
                break
            received += len(chunk)
            h.update(chunk)
            expected.compare(chunk)
            if peak_info is None and received >= expect // 2:
                peak_info = mptcp_info(sock)  # mid-transfer view: subflows in use while data flows
            if abort_after is not None and received >= abort_after:
                return _aborted(sock, report, received, h.hexdigest(), peer_role, expect, t0)
        thread.join(120 if deadline is None else max(deadline - time.monotonic(), 0.0) + 1.0)
        stopped = False
    except Stopped as exc:
        receive_error = receive_error or f"{type(exc).__name__}: {exc}"
        stopped = True
    if not finished.is_set() and not send_error:
        send_error.append("still sending when stopped" if stopped else "still sending at the deadline")
    report.update({
        "bytes_sent": send if not send_error and finished.is_set() else None,
        "send_error": send_error[0] if send_error else None,
        "receive_error": receive_error,
        "sha256_sent": sent.hexdigest(),
        "bytes_received": received,
        "sha256_received": h.hexdigest(),
        "sha256_expected": digest(peer_role, expect),
        # Where the bytes first went wrong (None: every byte received was right, maybe too few).
        "first_difference": expected.first_difference,
        "difference_sample": expected.sample.hex() or None,
        "received_saved": _save(save_mismatch, expected),
        "duration_s": round(time.monotonic() - t0, 3),
        "mptcp": is_mptcp(sock),
        "mptcp_info_mid": peak_info,
        "mptcp_info": mptcp_info(sock),
        "subflows": subflow_addrs(sock),
    })
    report["fallback"] = report["mptcp_info"] is None
    report["ok"] = (report["bytes_sent"] == send and received == expect
                    and report["sha256_received"] == report["sha256_expected"])
    return report


def _aborted(sock: socket.socket, report: dict, received: int, sha256_received: str, peer_role: str,
             expect: int, t0: float) -> dict:
    """Report of a side that closed abortively after `received` bytes (the sender thread may still
    be blocked in send: it dies with the process; the kernel has already reset the connection)."""
    info, subflows = mptcp_info(sock), subflow_addrs(sock)
    abort(sock)
    want = digest(peer_role, expect, prefix=received)
    report.update({"aborted_after": received, "bytes_received": received, "sha256_received": sha256_received,
                   "sha256_expected": want, "duration_s": round(time.monotonic() - t0, 3),
                   "mptcp_info": info, "subflows": subflows,
                   "fallback": info is None})
    report["ok"] = report["sha256_received"] == want
    return report


def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="transfer", description=__doc__.splitlines()[0])
    ap.add_argument("role", choices=("server", "client"))
    ap.add_argument("--addr", required=True, help="server: address to listen on; client: to connect to")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--tcp", action="store_true", help="plain TCP socket instead of IPPROTO_MPTCP")
    ap.add_argument("--send", type=int, default=0, help="bytes this side sends")
    ap.add_argument("--expect", type=int, default=0, help="bytes this side expects from the peer")
    ap.add_argument("--wait-subflows", type=int, default=1, help="hold data until this many subflows")
    ap.add_argument("--wait-timeout", type=float, default=5.0)
    ap.add_argument("--timeout", type=float, default=60.0,
                    help="seconds the whole exchange may take from the start (connect or accept included)")
    ap.add_argument("--report", required=True, help="path of the JSON report to write")
    ap.add_argument("--save-mismatch", type=Path, default=None, metavar="PATH",
                    help="if the received stream differs from the peer's, write it here (kept in memory)")
    ap.add_argument("--abort-after", type=int, default=None, metavar="BYTES",
                    help="after receiving BYTES, close with SO_LINGER 0 (MP_FASTCLOSE) instead of finishing")
    ap.add_argument("--send-delay", type=float, default=0.0, metavar="SECONDS",
                    help="wait this long before sending anything (data or DATA_FIN)")
    args = ap.parse_args(argv)

    _stop_on_sigterm()
    proto = 0 if args.tcp else IPPROTO_MPTCP
    family = _family(args.addr)
    report: dict
    lsock = None
    deadline = time.monotonic() + args.timeout
    try:
        if args.role == "server":
            lsock = socket.socket(family, socket.SOCK_STREAM, proto)
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                lsock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            lsock.bind((args.addr, args.port))
            lsock.listen(8)
            lsock.settimeout(args.timeout)
            print("listening", flush=True)
            sock, peer = lsock.accept()
            # The listener stays open for the connection's life: MP_JOIN SYNs come to this port.
        else:
            sock = socket.socket(family, socket.SOCK_STREAM, proto)
            sock.settimeout(args.timeout)
            sock.connect((args.addr, args.port))
            peer = sock.getpeername()
        sock.settimeout(args.timeout)
        local = list(sock.getsockname()[:2])  # read now: an aborting exchange closes the socket
        report = exchange(sock, args.role, args.send, args.expect, args.wait_subflows, args.wait_timeout,
                          args.abort_after, args.send_delay, deadline, args.save_mismatch)
        report.update({"local": local, "peer": list(peer[:2]), "socket": "tcp" if args.tcp else "mptcp"})
        sock.close()
        if lsock is not None:
            lsock.close()
    except (OSError, Stopped) as exc:
        report = {"role": args.role, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a report is written whole or not at all
    with open(args.report, "w") as f:
        json.dump(report, f, indent=2)
    return 0 if report.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
