"""The scripted peer: an MPTCP client played packet by packet from a script (conformance.inject.script).

Runs inside a host's network namespace (the Lab starts it there, with a netfilter rule that keeps
that host's kernel from resetting the connection it has no socket for). Each subflow has its own
path (source address, interface, the next hop's MAC as the host's kernel resolved it, so policy
routing of multihomed hosts holds); frames go out with scapy at layer 2, a sniffer on the
interfaces files the answers by port, and the peer tracks what a TCP/MPTCP
endpoint must: sequence and acknowledgment numbers, both keys, tokens and IDSNs, whether MPTCP and
DSS checksums were negotiated, the data sequence numbers each way. Every step's option values may
name that state ("$server_key", ...), so a script says what to send, not how to compute it.

    python -m conformance.inject.peer --script S.json --result R.json --dst B --dport P --sport Q
        --path SRC,IFACE,MAC [--path ...]

The result: every segment sent and received (flags, numbers, payload length, MPTCP options as our
codec decodes them) and the final state, as JSON."""

from __future__ import annotations

import argparse
import ipaddress
import json
import queue
import random
import sys
import time
from pathlib import Path

# Imported in the host's namespace (the Lab starts this module there): scapy reads that routing table.
from scapy.all import IP, TCP, AsyncSniffer, Ether, IPv6, conf, sendp

from conformance.endpoints.transfer import stream
from conformance.inject.script import option_classes, validate
from conformance.wire import DSS, MPCapable, MPJoinAck, MPJoinSyn, crypto, mptcp_options
from conformance.wire.bulk import decode_option

FLAG_BITS = {"F": 0x01, "S": 0x02, "R": 0x04, "P": 0x08, "A": 0x10, "U": 0x20, "E": 0x40, "C": 0x80}


def _flags(value: int) -> str:
    return "".join(k for k, bit in FLAG_BITS.items() if value & bit)


def _jsonable(v):
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    return v


class Subflow:
    """One TCP subflow of the peer: its own path (source address, interface, next hop's MAC), port
    and sequence numbers."""

    def __init__(self, index: int, src: str, iface: str, mac: str, sport: int) -> None:
        self.index, self.src, self.iface, self.mac, self.sport = index, src, iface, mac, sport
        self.isn = random.randrange(2**32)
        self.snd_nxt = self.isn
        self.rcv_nxt: int | None = None
        self.inbox: queue.Queue = queue.Queue()
        self.last_sent = None
        self.nonce = random.getrandbits(32)


class Peer:
    def __init__(self, paths: list[tuple[str, str, str]], dst: str, sport: int, dport: int,
                 payload: bytes = b"", client_key: int | None = None) -> None:
        """paths: (source address, interface, next hop's MAC) of each subflow the script may use."""
        conf.verb = 0
        self.v6 = ":" in dst
        self.IP, self.TCP = (IPv6 if self.v6 else IP), TCP
        self.dst, self.dport = dst, dport
        self.subflows = [Subflow(i, src, iface, mac, sport + i) for i, (src, iface, mac) in enumerate(paths)]
        self.client_key = client_key if client_key is not None else random.getrandbits(64) | 1
        self.server_key: int | None = None
        self.mptcp = False
        self.checksum = False
        self.sent_data = 0  # bytes of data-level payload sent (for our DSN)
        # What the transfer program's server expects from a client, so its SHA-256 check applies.
        self.payload = payload
        self.data_ack: int | None = None  # the server's next DSN, from its IDSN and what arrived
        self.log: list[dict] = []
        self.joins: list[dict] = []  # per join: what the SYN/ACK said and whether its HMAC verified
        self.by_port = {sf.sport: sf for sf in self.subflows}
        ip = "ip6" if self.v6 else "ip"
        ifaces = sorted({sf.iface for sf in self.subflows})
        self.sniffer = AsyncSniffer(iface=ifaces if len(ifaces) > 1 else ifaces[0], store=False, prn=self._file,
                                    filter=f"{ip} and tcp and src port {dport}")
        self.sniffer.start()
        time.sleep(0.3)  # the sniffer's socket must be open before the first answer can arrive

    def _file(self, pkt) -> None:
        if self.TCP in pkt and pkt[self.TCP].dport in self.by_port:
            self.by_port[pkt[self.TCP].dport].inbox.put(pkt)

    def sub(self, step: dict) -> Subflow:
        i = step.get("subflow", 0)
        if i >= len(self.subflows):
            raise RuntimeError(f"subflow {i}: the peer has {len(self.subflows)} path(s)")
        return self.subflows[i]

    # -- state as the script may name it
    def variables(self) -> dict[str, int | None]:
        s = self.server_key
        return {"$client_key": self.client_key, "$server_key": s,
                "$server_token": crypto.token(s) if s is not None else None,
                "$client_idsn": crypto.idsn(self.client_key),
                "$server_idsn": crypto.idsn(s) if s is not None else None,
                "$data_ack": self.data_ack, "$dsn": (crypto.idsn(self.client_key) + 1 + self.sent_data) % 2**64}

    def options(self, specs: list[dict]) -> list:
        classes, values = option_classes(), self.variables()
        out = []
        for spec in specs:
            (name, fields), = spec.items()
            resolved = {k: values[v] if isinstance(v, str) and v.startswith("$") and v != "$hmac" else v
                        for k, v in fields.items()}
            if resolved.get("truncated_hmac") == "$hmac":
                resolved["truncated_hmac"] = crypto.add_addr_hmac(
                    self.client_key, self.server_key, resolved.get("address_id", 0),
                    ipaddress.ip_address(resolved["address"]).packed, resolved.get("port"))
            missing = [k for k, v in resolved.items() if v is None]
            if missing:
                raise RuntimeError(f"{name}: {', '.join(missing)} named state not known yet")
            out.append(classes[name](**resolved))
        return out

    # -- the wire
    def send(self, sf: Subflow, flags: str, opts: list, payload: bytes = b"", mss: int | None = None,
             seq_offset: int = 0) -> None:
        tcp_opts = ([("MSS", mss)] if mss else []) + list(opts)
        seq = (sf.snd_nxt + seq_offset) % 2**32
        seg = self.TCP(sport=sf.sport, dport=self.dport, flags=flags, seq=seq,
                       ack=sf.rcv_nxt or 0, window=65535, options=tcp_opts)
        frame = Ether(dst=sf.mac) / self.IP(src=sf.src, dst=self.dst) / seg / payload
        sendp(frame, iface=sf.iface, verbose=0)
        sf.last_sent = frame
        self._record(sf, "out", Ether(bytes(frame)))  # as it went out: options in their wire form
        sf.snd_nxt = (sf.snd_nxt + len(payload) + (1 if "S" in flags or "F" in flags else 0)) % 2**32

    def _record(self, sf: Subflow, direction: str, pkt) -> dict:
        tcp = pkt[self.TCP]
        entry = {"dir": direction, "subflow": sf.index, "t": time.time(), "flags": _flags(int(tcp.flags)),
                 "seq": tcp.seq, "ack": tcp.ack, "len": len(bytes(tcp.payload)), "window": tcp.window,
                 "options": [[n, {k: _jsonable(v) for k, v in f.items()}]
                             for n, f in (decode_option(bytes(o)) for o in mptcp_options(tcp))]}
        self.log.append(entry)
        return entry

    def receive(self, sf: Subflow, timeout: float) -> dict | None:
        try:
            pkt = sf.inbox.get(timeout=max(timeout, 0))
        except queue.Empty:
            return None
        entry = self._record(sf, "in", pkt)
        tcp = pkt[self.TCP]
        if "S" in entry["flags"] and "A" in entry["flags"]:
            sf.rcv_nxt = (tcp.seq + 1) % 2**32
        elif (entry["len"] or "F" in entry["flags"]) and (sf.rcv_nxt is None or tcp.seq == sf.rcv_nxt):
            sf.rcv_nxt = (tcp.seq + entry["len"] + (1 if "F" in entry["flags"] else 0)) % 2**32
        for name, f in entry["options"]:
            if name == "DSS" and f.get("data_level_length") and f.get("dsn") is not None and self.mptcp:
                end = (f["dsn"] + f["data_level_length"]) % 2**64 if f["flags"] & 0x08 else None
                if end is not None and (self.data_ack is None or 0 < (end - self.data_ack) % 2**64 < 2**63):
                    self.data_ack = end
        return entry

    # -- steps
    def syn(self, step: dict) -> None:
        sf = self.sub(step)
        self.send(sf, "S", self.options(step.get("options", [])), mss=step.get("mss", 1400))
        deadline = time.monotonic() + step.get("wait", 2)
        while (entry := self.receive(sf, deadline - time.monotonic())) is not None:
            if "R" in entry["flags"]:
                return
            if "S" in entry["flags"] and "A" in entry["flags"]:
                mpc = next((f for n, f in entry["options"] if n == "MPCapable"), None)
                if mpc is not None and mpc.get("sender_key") is not None:
                    self.mptcp = True
                    self.server_key = mpc["sender_key"]
                    sent = next((o for o in self.log[0]["options"] if o[0] == "MPCapable"), None)
                    self.checksum = bool(mpc["flags"] & 0x80 or (sent and sent[1]["flags"] & 0x80))
                    self.data_ack = (crypto.idsn(self.server_key) + 1) % 2**64
                return

    def join(self, step: dict) -> None:
        """An MP_JOIN handshake on a new subflow: SYN with the server's token (or `token`), the
        SYN/ACK's truncated HMAC checked, the third ACK with our HMAC ("good"), a corrupted one
        ("bad") or no MP_JOIN at all ("none")."""
        sf = self.sub(step)
        if self.server_key is None:
            raise RuntimeError("no MPTCP connection to join (no server key yet)")
        token = step.get("token", crypto.token(self.server_key))
        syn = MPJoinSyn(address_id=step.get("address_id", sf.index), backup=step.get("backup", 0),
                        receiver_token=token, sender_random=sf.nonce)
        self.send(sf, "S", [syn], mss=1400)
        record = {"subflow": sf.index, "synack": False}
        self.joins.append(record)
        deadline = time.monotonic() + step.get("wait", 2)
        while (entry := self.receive(sf, deadline - time.monotonic())) is not None:
            if "R" in entry["flags"]:
                return
            if "S" in entry["flags"] and "A" in entry["flags"]:
                break
        else:
            return
        record["synack"] = True
        answer = next((f for n, f in entry["options"] if n == "MPJoinSynAck"), None)
        if answer is None:
            return
        record["synack_hmac_ok"] = crypto.verify_join_synack(
            answer["sender_truncated_hmac"], self.server_key, self.client_key, answer["sender_random"], sf.nonce)
        mac = crypto.join_hmac(self.client_key, self.server_key, sf.nonce, answer["sender_random"])[:20]
        hmac = step.get("hmac", "good")
        if hmac == "bad":
            mac = bytes([mac[0] ^ 0xFF]) + mac[1:]
        self.send(sf, "A", [] if hmac == "none" else [MPJoinAck(sender_hmac=mac)])
        # The joined host acknowledges the third ACK (or resets the subflow).
        self.receive(sf, step.get("wait", 2))

    def _next_payload(self, size: int) -> bytes:
        chunk = self.payload[self.sent_data:self.sent_data + size]
        return chunk + bytes(size - len(chunk))

    def _dss(self, sf: Subflow, size: int, fin: bool = False, dsn_bits: int = 64,
             checksum: str = "auto") -> list:
        dsn = (crypto.idsn(self.client_key) + 1 + self.sent_data) % 2**64
        ssn = 0 if fin and not size else (sf.snd_nxt - sf.isn) % 2**32
        length = size + (1 if fin else 0)
        wire_dsn = dsn if dsn_bits == 64 else dsn % 2**32
        flags = "AaM" + ("m" if dsn_bits == 64 else "") + ("F" if fin else "")
        fields = {"flags": flags, "data_ack": self.data_ack, "dsn": wire_dsn, "ssn": ssn,
                  "data_level_length": length}
        # The checksum is over the 64-bit DSN whatever the width sent (§3.3.1).
        if checksum in ("always", "bad") or (checksum == "auto" and self.checksum):
            fields["checksum"] = crypto.dss_checksum(dsn, ssn, length, self._next_payload(size))
            if checksum == "bad":  # what a receiver computes after a middlebox changed the data
                fields["checksum"] ^= 0xFFFF
        return [DSS(**fields)]

    def data(self, step: dict) -> None:
        sf, size = self.sub(step), step["size"]
        # A hole at the data level: these bytes are mapped and sent by no one (another subflow's,
        # lost with it); the subflow's own sequence numbers stay contiguous.
        self.sent_data += step.get("skip", 0)
        if step.get("mapping") == "auto":
            opts = self._dss(sf, size, dsn_bits=step.get("dsn_bits", 64), checksum=step.get("checksum", "auto"))
        elif step.get("mapping") == "infinite":
            # §3.7: data-level length 0, from this segment's DSN and subflow sequence number on
            # (the last data known delivered is what came before); a checksum, if used, is 0.
            dsn = (crypto.idsn(self.client_key) + 1 + self.sent_data) % 2**64
            fields = {"flags": "AaMm", "data_ack": self.data_ack, "dsn": dsn,
                      "ssn": (sf.snd_nxt - sf.isn) % 2**32, "data_level_length": 0}
            if self.checksum:
                fields["checksum"] = 0
            opts = [DSS(**fields)]
        elif step.get("mapping") == "mpc":
            fields = {"flags": 0x81 if self.checksum else 0x01, "sender_key": self.client_key,
                      "receiver_key": self.server_key, "data_level_length": size}
            if self.checksum:
                fields["checksum"] = crypto.dss_checksum((crypto.idsn(self.client_key) + 1) % 2**64, 1, size,
                                                         self._next_payload(size))
            opts = [MPCapable(**fields)]
        else:
            opts = self.options(step.get("options", []))
        self.send(sf, "PA" if step.get("push", True) else "A", opts, self._next_payload(size))
        self.sent_data += size

    def data_fin(self, step: dict) -> None:
        sf = self.sub(step)
        opts = self.options(step["options"]) if "options" in step else self._dss(sf, 0, fin=True)
        self.send(sf, "FA" if step.get("tcp_fin", True) else "A", opts)

    def fin(self, step: dict) -> None:
        sf = self.sub(step)
        self.send(sf, "FA", self.options(step.get("options", [])))

    def recv(self, step: dict) -> None:
        sf = self.sub(step)
        until, timeout = step.get("until", "any"), step.get("timeout", 2)
        want = int(until[5:]) if until.startswith("data:") else None
        got_bytes = 0
        deadline = time.monotonic() + timeout
        while True:
            entry = self.receive(sf, deadline - time.monotonic())
            if entry is None:
                return
            got_bytes += entry["len"]
            flags = entry["flags"]
            if (entry["len"] or "F" in flags) and step.get("ack", True) and "R" not in flags:
                self.ack({"subflow": sf.index})
            if until == "any" or (until == "fin" and "F" in flags) or (until == "rst" and "R" in flags):
                return
            if want is not None and got_bytes >= want:
                return
            if until == "quiet":
                deadline = time.monotonic() + timeout

    def ack(self, step: dict) -> None:
        sf = self.sub(step)
        if "options" in step:
            opts = self.options(step["options"])
        elif self.mptcp and self.data_ack is not None and any(e["dir"] == "in" and any(
                n == "DSS" for n, _ in e["options"]) for e in self.log):
            opts = [DSS(flags="Aa", data_ack=self.data_ack)]
        else:
            opts = []
        self.send(sf, "A", opts, seq_offset=step.get("seq_offset", 0))

    def resend(self, step: dict) -> None:
        sf = self.sub(step)
        if sf.last_sent is None:
            raise RuntimeError("nothing was sent on this subflow yet")
        sendp(sf.last_sent, iface=sf.iface, verbose=0)
        self._record(sf, "out", Ether(bytes(sf.last_sent)))

    def rst(self, step: dict) -> None:
        sf = self.sub(step)
        self.send(sf, "R", self.options(step.get("options", [])), seq_offset=step.get("seq_offset", 0))

    def run(self, steps: list[dict]) -> dict:
        error = None
        for i, step in enumerate(steps):
            try:
                if step["op"] == "sleep":
                    time.sleep(step["seconds"])
                else:
                    getattr(self, step["op"])(step)
            except RuntimeError as exc:
                error = f"step {i + 1} ({step['op']}): {exc}"
                break
        time.sleep(0.2)
        for sf in self.subflows:  # late answers are part of the evidence too
            while self.receive(sf, 0.05) is not None:
                pass
        self.sniffer.stop()
        self.log.sort(key=lambda e: e["t"])
        return {"error": error, "segments": self.log, "mptcp": self.mptcp, "checksum": self.checksum,
                "client_key": self.client_key, "server_key": self.server_key, "joins": self.joins,
                "subflows": [{"src": sf.src, "iface": sf.iface, "sport": sf.sport, "isn": sf.isn}
                             for sf in self.subflows]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="conformance.inject.peer")
    for name in ("--script", "--result", "--dst"):
        ap.add_argument(name, required=True)
    ap.add_argument("--path", action="append", required=True, metavar="SRC,IFACE,MAC",
                    help="one per subflow the script may use: source address, interface, next hop's MAC")
    ap.add_argument("--dport", type=int, required=True)
    ap.add_argument("--sport", type=int, required=True, help="the first subflow's port; the next ones count up")
    ap.add_argument("--payload-size", type=int, default=0, help="the bytes a transfer client would send")
    ap.add_argument("--client-key", type=lambda v: int(v, 0), help="our MP_CAPABLE key (default: random)")
    args = ap.parse_args(argv)
    steps = validate(json.loads(Path(args.script).read_text()), args.script)
    payload = b"".join(stream("client", args.payload_size))
    paths = [tuple(p.split(",")) for p in args.path]
    result = Peer(paths, args.dst, args.sport, args.dport, payload, args.client_key).run(steps)
    tmp = Path(args.result + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(args.result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
