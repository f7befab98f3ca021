"""A corpus of live kernel-to-kernel MPTCP captures for checking our codec against independent
oracles (tshark, the kernel's own cryptography). Root only: every scenario runs in its own Lab
(topology, captures, Cleanup), torn down before the next one starts.

One scenario per address family, on n_path n=3 multihomed=server (c1 single-homed behind rc, so
its capture holds every subflow; s1 with three addresses), links shaped to `bw` Mbit/s so that a
transfer lasts long enough to act in the middle of it. Conditions are created the way the kernel's
selftests create them (see /work/shared/notes/kernel-mptcp.md). Three transfers per scenario:

  first-data  no endpoints yet and a server that holds its data back: the client's first data
              segments carry MP_CAPABLE with data (22 bytes, 24 with a checksum) after the
              4/12/20-byte handshake; DSS of every form the kernel uses, DATA_FIN.
  main        the server signals its second address (ADD_ADDR, no port) and its third with a port
              (ADD_ADDR with port); the client echoes both and joins both (MP_JOIN, one of them to
              the announced port). Mid-transfer the server flips endpoint 1 to backup (MP_PRIO)
              and deletes endpoint 2 (REMOVE_ADDR; the client resets that subflow: MP_TCPRST).
  abort       the client reads part of the server's stream and closes with SO_LINGER 0
              (MP_FASTCLOSE + MP_TCPRST on every subflow).

IPv4 runs with DSS checksums off, IPv6 with `net.mptcp.checksum_enabled=1` on both hosts (the A flag
in MP_CAPABLE, checksums in MP_CAPABLE with data and in DSS) and whole-segment captures, so the
checksums can be recomputed over the payload. Building takes about 15 s."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from conformance.endpoints.linux import EndpointFlags, MptcpConfig, PMEndpoint
from conformance.errors import HarnessError
from conformance.lab import Lab, TransferRun
from conformance.net.cleanup import Cleanup
from conformance.net.registry import make_topology
from conformance.proc import run

SIGNAL_PORT = 10100  # the port announced with the third address (kernel selftests use 10100 too)
FULL_SNAPLEN = 0  # tcpdump -s 0: whole frames, so DSS checksums can be recomputed over the payload


@dataclass(frozen=True)
class Scenario:
    name: str
    family: str
    checksum: bool
    bw: float = 4.0  # Mbit/s per shaped link: slow enough to act mid-transfer
    size: int = 800_000  # bytes each way in the main transfer


SCENARIOS = (Scenario("paths-ipv4", "ipv4", checksum=False), Scenario("paths-ipv6", "ipv6", checksum=True))


@dataclass(frozen=True)
class CorpusPcap:
    scenario: str
    family: str
    checksum: bool
    transfer: str  # "first-data", "main" or "abort"
    node: str
    intf: str
    path: Path
    full_payload: bool


@dataclass
class Corpus:
    folder: Path
    pcaps: list[CorpusPcap] = field(default_factory=list)
    runs: dict[str, TransferRun] = field(default_factory=dict)  # "<scenario>/<transfer>" -> evidence
    actions: list[str] = field(default_factory=list)  # what was done mid-transfer, with timing
    seconds: float = 0.0

    def endpoint_pcaps(self) -> list[CorpusPcap]:
        """The pcaps taken on the two hosts' own interfaces (each segment once per side)."""
        return [p for p in self.pcaps if p.node in ("c1", "s1")]


def _established(lab: Lab, node: str) -> int:
    out = run(["ss", "-Htn", "state", "established"], netns=lab.net.netns(node), check=False).stdout
    return sum(1 for line in out.splitlines() if line.strip())


def _ip_mptcp(lab: Lab, node: str, *args: str) -> None:
    run(["ip", "mptcp", "endpoint", *args], netns=lab.net.netns(node))


def _mid_transfer(lab: Lab, corpus: Corpus, scenario: Scenario, subflows: int) -> Callable[[int], None]:
    """Once all subflows are up: server endpoint 1 becomes backup (MP_PRIO), endpoint 2 is deleted
    (REMOVE_ADDR), each while data still flows."""

    def act(port: int) -> None:
        t0 = time.monotonic()
        deadline = t0 + 20
        while _established(lab, "c1") < subflows:
            if time.monotonic() > deadline:
                raise HarnessError(f"{scenario.name}: fewer than {subflows} subflows after 20 s")
            time.sleep(0.01)
        _ip_mptcp(lab, "s1", "change", "id", "1", "backup")
        corpus.actions.append(f"{scenario.name}: endpoint id 1 -> backup at +{time.monotonic() - t0:.2f}s")
        time.sleep(0.15)
        _ip_mptcp(lab, "s1", "delete", "id", "2")
        corpus.actions.append(f"{scenario.name}: endpoint id 2 deleted at +{time.monotonic() - t0:.2f}s")

    return act


def _record(corpus: Corpus, lab: Lab, scenario: Scenario, transfer: str, tr: TransferRun, full: bool) -> None:
    corpus.runs[f"{scenario.name}/{transfer}"] = tr
    nodes = {intf: node for node, intf in lab.topo.interfaces()}
    for intf, path in sorted(tr.pcaps.items()):
        corpus.pcaps.append(CorpusPcap(scenario.name, scenario.family, scenario.checksum, transfer, nodes[intf],
                                       intf, path, full))


def run_scenario(scenario: Scenario, folder: Path, corpus: Corpus) -> None:
    cleanup = Cleanup()
    try:
        topo = make_topology("n_path", n=3, multihomed="server", family=scenario.family, bw=scenario.bw)
        lab = Lab(topo, folder / scenario.name, cleanup, family=scenario.family)
        addrs = lab.addresses("s1")
        snaplen = FULL_SNAPLEN if scenario.checksum else 256
        # An IPv6 ADD_ADDR with port and HMAC is 30 bytes: Linux sends it only when the 12 bytes of
        # timestamps leave room for it (40 bytes of option space), so the server goes without them.
        sysctls = {"net.ipv4.tcp_timestamps": "0"} if scenario.family == "ipv6" else {}
        lab.configure("s1", MptcpConfig(checksum=scenario.checksum, subflows=4, sysctls=sysctls))
        lab.configure("c1", MptcpConfig(checksum=scenario.checksum, subflows=4, add_addr_accepted=4))
        # No endpoint yet and a silent server: the client's first data segment is the first packet
        # after the handshake, so it carries MP_CAPABLE with data (22 bytes, 24 with a checksum).
        first = lab.transfer(up=30_000, down=30_000, server_send_delay=0.2, snaplen=snaplen, timeout=30)
        _record(corpus, lab, scenario, "first-data", first, scenario.checksum)

        lab.configure("s1", MptcpConfig(checksum=scenario.checksum, sysctls=sysctls, endpoints=[
            PMEndpoint(addrs[1], EndpointFlags.SIGNAL, dev="s1-eth1", id=1),
            PMEndpoint(addrs[2], EndpointFlags.SIGNAL, dev="s1-eth2", id=2, port=SIGNAL_PORT)]))
        main = lab.transfer(up=scenario.size, down=scenario.size, wait_subflows=3, snaplen=snaplen, timeout=30,
                            during=_mid_transfer(lab, corpus, scenario, 3))
        _record(corpus, lab, scenario, "main", main, scenario.checksum)

        # The client reads 100 kB of the server's 1 MB and closes abortively: MP_FASTCLOSE, MP_TCPRST.
        aborted = lab.transfer(up=20_000, down=1_000_000, abort_after=100_000, snaplen=snaplen, timeout=30)
        _record(corpus, lab, scenario, "abort", aborted, scenario.checksum)
    finally:
        cleanup.run()


def build_corpus(folder: Path, scenarios: tuple[Scenario, ...] = SCENARIOS) -> Corpus:
    """Run every scenario (one Lab each, cleaned up before the next) and list its captures."""
    corpus = Corpus(folder)
    t0 = time.monotonic()
    for scenario in scenarios:
        run_scenario(scenario, folder, corpus)
    corpus.seconds = time.monotonic() - t0
    return corpus


if __name__ == "__main__":  # build a corpus by hand (root): python tests/wire_corpus.py DIR
    import sys

    out = build_corpus(Path(sys.argv[1]))
    print(f"{len(out.pcaps)} pcaps in {out.seconds:.1f}s")
    print("\n".join(out.actions))
