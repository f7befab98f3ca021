"""A TCP-terminating proxy, the middlebox that speaks plain TCP to both sides (RFC 8684 §3.7's
reason for falling back at the handshake): the router's netfilter redirects the client's
connections (nat PREROUTING REDIRECT) to this process, which accepts them with a plain TCP
socket, opens its own plain TCP connection to the original destination (SO_ORIGINAL_DST) and
relays bytes both ways, half-closes included. Neither end sees the other's TCP options.

Runs in the router's namespace; stats (connections, bytes each way, errors) go to `--stats` as
JSON when it stops (SIGTERM).

    python -m conformance.middlebox.proxy --port 47001 --stats FILE
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import select
import signal
import socket
import struct
import sys
import threading
from pathlib import Path

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST has the same number


def original_destination(conn: socket.socket) -> tuple[str, int]:
    """Where the client meant to connect before REDIRECT changed it."""
    if conn.family == socket.AF_INET6:
        raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)  # sockaddr_in6
        port = struct.unpack_from("!H", raw, 2)[0]
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)  # sockaddr_in
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntop(socket.AF_INET, raw[4:8]), port


class Proxy:
    def __init__(self, port: int) -> None:
        self.stats = {"port": port, "connections": 0, "c2s_bytes": 0, "s2c_bytes": 0, "errors": [],
                      "destinations": []}
        self.lock = threading.Lock()
        # One listener per family (plain TCP): SO_ORIGINAL_DST is asked of each in its own family.
        self.listeners = []
        for family, anywhere in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((anywhere, port))
            sock.listen(64)
            self.listeners.append(sock)

    def count(self, key: str, n: int) -> None:
        with self.lock:
            self.stats[key] += n

    def serve(self) -> None:
        while True:
            ready, _, _ = select.select(self.listeners, [], [])
            for sock in ready:
                conn, _ = sock.accept()
                threading.Thread(target=self.relay, args=(conn,), daemon=True).start()

    def relay(self, conn: socket.socket) -> None:
        try:
            host, port = original_destination(conn)
            mapped = ipaddress.ip_address(host)
            family = socket.AF_INET if mapped.version == 4 else socket.AF_INET6
            upstream = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # plain TCP, never MPTCP
            upstream.connect((host, port))
        except OSError as exc:
            with self.lock:
                self.stats["errors"].append(f"connect: {exc}")
            conn.close()
            return
        with self.lock:
            self.stats["connections"] += 1
            self.stats["destinations"].append(f"{host}:{port}")
        back = threading.Thread(target=self.pump, args=(upstream, conn, "s2c_bytes"), daemon=True)
        back.start()
        self.pump(conn, upstream, "c2s_bytes")
        back.join()
        conn.close()
        upstream.close()

    def pump(self, src: socket.socket, dst: socket.socket, key: str) -> None:
        try:
            while chunk := src.recv(1 << 16):
                dst.sendall(chunk)
                self.count(key, len(chunk))
            dst.shutdown(socket.SHUT_WR)  # the half-close goes on to the other side
        except OSError as exc:
            with self.lock:
                self.stats["errors"].append(f"{key}: {exc}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m conformance.middlebox.proxy")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--stats", type=Path, required=True)
    args = ap.parse_args(argv)
    proxy = Proxy(args.port)

    def finish(*_) -> None:
        with proxy.lock:
            args.stats.write_text(json.dumps(proxy.stats, indent=2))
        sys.exit(0)

    signal.signal(signal.SIGTERM, finish)
    print("ready", flush=True)
    proxy.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
