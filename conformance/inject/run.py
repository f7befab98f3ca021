"""Running a script of the scripted peer against a kernel listener in a Lab, with the evidence.

The peer plays the client from a host of the topology (default: the topology's client, its first
interface); the kernel of the server node listens with the suite's transfer program. Every link is
captured, both nodes' MIB counters are read before and after, and the peer's own log of what it
sent and received comes back with them. The peer's host kernel has no socket for the peer's
connection: a netfilter rule (tagged with the run prefix, removed afterwards) keeps it from
answering the server's segments with resets."""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from conformance.errors import HarnessError
from conformance.inject.script import validate
from conformance.net.cleanup import Cleanup
from conformance.net.names import run_prefix
from conformance.proc import run

if TYPE_CHECKING:
    from conformance.lab import Lab
    from conformance.verdict import Expect


@dataclass
class ScriptRun:
    folder: Path
    peer: dict  # the peer's result: segments sent and received, keys, whether MPTCP was negotiated
    server: dict | None  # the transfer program's report, if it finished
    counters: dict[str, dict[str, int]]  # node -> non-zero MIB counter deltas
    pcaps: dict[str, Path]  # interface -> capture
    port: int
    notes: list[str] = field(default_factory=list)

    @property
    def received(self) -> list[dict]:
        return [s for s in self.peer["segments"] if s["dir"] == "in"]

    def first(self, flags: str) -> dict | None:
        """The first received segment whose flags include all of `flags`."""
        return next((s for s in self.received if all(f in s["flags"] for f in flags)), None)

    @staticmethod
    def option(segment: dict | None, name: str) -> dict | None:
        if segment is None:
            return None
        return next((f for n, f in segment["options"] if n == name), None)

    def expect_intact(self, e: Expect, what: str, *, rid: str | None = None, **report: object) -> bool:
        """The listener's transfer program got all it expected, SHA-256 as sent (and its report's
        other fields as given, e.g. fallback=True)."""
        got = self.server or {}

        def holds(key: str, want: object) -> bool:
            if key == "mptcp" and got.get(key) is None and want is True:
                # A kernel without TCP_IS_MPTCP (Debian's 6.1): MPTCP_INFO answering says it alone.
                return got.get("fallback") is False
            return got.get(key) == want

        return e.that(got.get("ok") is True and all(holds(k, v) for k, v in report.items()), what,
                      expected=", ".join(["data intact (SHA-256)", *(f"{k}={v}" for k, v in report.items())]),
                      seen={k: got.get(k) for k in ("ok", "bytes_received", "fallback", *report)} if got
                      else "no report",
                      rid=rid)

    def expect_no_reset(self, e: Expect, what: str, *, rid: str | None = None) -> bool:
        """No RST from the listener on any subflow."""
        rst = self.first("R")
        return e.that(rst is None, what, expected="no RST", seen=self.describe(rst) if rst else "none", rid=rid)

    def describe(self, segment: dict | None) -> str:
        """A received segment in a failure message: flags, numbers, options."""
        if segment is None:
            return "no such segment from the server"
        opts = ", ".join(f"{n}({', '.join(f'{k}={v}' for k, v in f.items() if k not in ('kind', 'subtype'))})"
                         for n, f in segment["options"]) or "no MPTCP option"
        return f"[{segment['flags']}] seq={segment['seq']} ack={segment['ack']} len={segment['len']} {opts}"


def run_script(lab: Lab, steps: list[dict], *, peer: str | None = None, server: str | None = None,
               expect: int = 0, send: int = 0, mptcp_server: bool = True, timeout: float = 20,
               server_send_delay: float = 0.0, client_key: int | None = None) -> ScriptRun:
    """Run `steps` (see conformance.inject.script) from `peer` against a kernel listener on
    `server` that expects `expect` bytes and sends `send` (after `server_send_delay` seconds: the
    listener closes its side once it has sent, and a closing connection takes no joins).
    `client_key`: the peer's MP_CAPABLE key, e.g. one whose IDSN lies just below a 2^32 boundary."""
    steps = validate(steps)
    peer = peer or lab.topo.client
    if peer in lab.seats:
        from conformance.implementations import ImplementationUnsupported

        raise ImplementationUnsupported(f"our scripted peer plays {peer} in this case, not "
                                        f"{lab.implementation(peer).name}")
    server = server or lab.topo.server
    port = lab.next_port()
    folder = lab.folder / f"script-{port}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "script.json").write_text(json.dumps(steps, indent=1))
    family = 6 if lab.family == "ipv6" else 4
    dst = lab.topo.addresses(server, family)[0]
    netns = lab.net.netns(peer)
    paths = [_path(netns, src, dst) for src in lab.topo.addresses(peer, family)]
    sport = random.randrange(20000, 60000)
    with lab.record(folder) as (rec, local):
        _guard(netns, sport, len(paths), family, local)
        srv = lab.start_endpoint(server, "server", lab.listen_address(), port, send, expect, mptcp_server, 1,
                                 folder, local, timeout, send_delay=server_send_delay)
        argv = [sys.executable, "-m", "conformance.inject.peer", "--script", str(folder / "script.json"),
                "--result", str(folder / "peer.json"), "--dst", dst, "--dport", str(port),
                "--sport", str(sport), "--payload-size", str(expect)]
        for p in paths:
            argv += ["--path", ",".join(p)]
        if client_key is not None:
            argv += ["--client-key", hex(client_key)]
        out = run(argv, netns=netns, timeout=timeout + 30, check=False)
        (folder / "peer.out").write_text(out.stdout + out.stderr)
        if out.returncode != 0 or not (folder / "peer.json").exists():
            raise HarnessError(f"the scripted peer on {peer} failed (exit {out.returncode}): "
                               f"{(out.stderr or out.stdout).strip()[-500:]}")
        deadline = time.monotonic() + 3
        while expect and srv.running() and time.monotonic() < deadline:  # its report, if it got its data
            time.sleep(0.05)
        time.sleep(0.2)  # the last answers cross the links before the captures close
    report = folder / "server.json"
    result = ScriptRun(folder, json.loads((folder / "peer.json").read_text()),
                       json.loads(report.read_text()) if report.exists() else None, rec.counters, rec.pcaps, port)
    if result.peer.get("error"):
        raise HarnessError(f"the script stopped: {result.peer['error']}")
    return result


def _path(netns: str, src: str, dst: str) -> tuple[str, str, str]:
    """(source, interface, next hop's MAC) as the host's kernel routes `src` -> `dst` (policy
    routing included); the neighbour entry is made by one ping if the kernel has none yet."""
    route = json.loads(run(["ip", "-j", "route", "get", dst, "from", src], netns=netns).stdout)[0]
    dev, hop = route["dev"], route.get("gateway", dst)
    run(["ping", "-c", "1", "-W", "1", "-I", src, hop], netns=netns, check=False)
    for _ in range(20):
        neigh = json.loads(run(["ip", "-j", "neigh", "show", hop, "dev", dev], netns=netns).stdout or "[]")
        mac = next((n["lladdr"] for n in neigh if n.get("lladdr")), None)
        if mac:
            return src, dev, mac
        time.sleep(0.05)
    raise HarnessError(f"no neighbour entry for {hop} on {dev} in {netns}: cannot address frames to it")


def _guard(netns: str, sport: int, count: int, family: int, cleanup: Cleanup) -> None:
    """Keep the peer host's kernel from resetting a connection it has no socket for."""
    tool = "ip6tables" if family == 6 else "iptables"
    ports = f"{sport}:{sport + count - 1}"
    rule = ["OUTPUT", "-p", "tcp", "--sport", ports, "--tcp-flags", "RST", "RST", "-m", "comment",
            "--comment", f"{run_prefix()}-peer-guard", "-j", "DROP"]
    run([tool, "-I", *rule], netns=netns)
    cleanup.defer(f"remove the peer's RST guard in {netns}", lambda: run([tool, "-D", *rule], netns=netns,
                                                                          check=False))
