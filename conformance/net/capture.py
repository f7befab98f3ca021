"""Packet capture: one tcpdump per interface, one pcap per interface, in a case's artefact folder."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from pathlib import Path

from conformance.errors import HarnessError
from conformance.net.cleanup import Cleanup
from conformance.proc import Background

DEFAULT_SNAPLEN = 256  # headers with every TCP option, plus the start of the payload


@dataclass
class Pcap:
    node: str
    intf: str
    path: Path


class Capture:
    """tcpdump on every (node, interface) given; stop() flushes and closes every file."""

    def __init__(self, targets: list[tuple[str, str, str]], folder: Path, cleanup: Cleanup, *,
                 snaplen: int = DEFAULT_SNAPLEN, bpf: str = "tcp or icmp or icmp6"):
        """targets: (node, netns, interface)."""
        folder.mkdir(parents=True, exist_ok=True)
        self.pcaps: list[Pcap] = []
        self._procs: list[Background] = []
        cleanup.defer("stop captures", self.stop)
        for node, netns, intf in targets:
            path = folder / f"{intf}.pcap"
            proc = Background(["tcpdump", "-n", "-i", intf, "-s", str(snaplen), "-U", "-w", str(path),
                               "--immediate-mode", bpf], netns=netns, stderr=folder / f"{intf}.tcpdump.log")
            self._procs.append(proc)
            self.pcaps.append(Pcap(node, intf, path))
        self._wait_listening()

    def _wait_listening(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        pending = list(self._procs)
        while pending and time.monotonic() < deadline:
            for proc in list(pending):
                if "listening on" in proc.errors():
                    pending.remove(proc)
                elif not proc.running():
                    raise HarnessError(f"tcpdump exited at start: {proc.errors().strip()}")
            time.sleep(0.01)
        if pending:
            raise HarnessError(f"tcpdump not capturing after {timeout}s: {pending[0].argv}")

    def stop(self) -> list[Pcap]:
        # SIGINT makes tcpdump flush and close the file cleanly.
        for proc in self._procs:
            proc.stop(signal.SIGINT)
        self._procs.clear()
        return self.pcaps

    def pcap(self, intf: str) -> Path:
        for p in self.pcaps:
            if p.intf == intf:
                return p.path
        raise KeyError(intf)
