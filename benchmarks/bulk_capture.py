"""The bulk capture the benchmarks measure on (shared by codec.py and checker.py; not a script).

A kernel-to-kernel bulk transfer over `two_path` with a second subflow (a join endpoint on the
client's second interface), both directions at once, captured by the Lab at its default snaplen;
the client's two interfaces (one subflow each) merged into one classic pcap with mergecap.
Transfers are repeated until the file holds at least the packets asked for. Making it needs root
(namespaces, veth, tcpdump); the namespaces are gone when make_capture returns or raises.

The benchmarks import it as `from bulk_capture import ...`: a script's own folder comes first on
sys.path, so `.venv/bin/python benchmarks/<name>.py` finds it from any working directory."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

from conformance.errors import InputError
from conformance.wire.bulk import pcap_stats

TOPOLOGY = "two_path"
MB = 1_000_000
# Packets a transfer of one byte each way makes on the client's two interfaces, roughly: a data
# segment per MSS each way, and about one ACK per two segments.
PACKETS_PER_BYTE = 2 * 1.5 / 1400


def make_capture(folder: Path, target: int, log: Callable[[str], None]) -> tuple[Path, list[str]]:
    """A merged pcap of the client's two subflows with at least `target` packets (in `folder`),
    and notes for the report (transfers merged, a shortfall)."""
    from conformance.endpoints.linux import EndpointFlags, MptcpConfig, PMEndpoint
    from conformance.lab import Lab
    from conformance.net.cleanup import Cleanup
    from conformance.net.registry import make_topology

    notes: list[str] = []
    merged = folder / "bulk.pcap"
    parts: list[Path] = []
    cleanup = Cleanup()
    try:
        lab = Lab(make_topology(TOPOLOGY, family="ipv4"), folder / "lab", cleanup)
        second = lab.addresses("c1")[1]
        lab.configure("s1", MptcpConfig(subflows=2))
        lab.configure("c1", MptcpConfig(subflows=2, endpoints=[PMEndpoint(second, EndpointFlags.SUBFLOW,
                                                                          dev="c1-eth1")]))
        have = 0
        for attempt in range(4):
            size = max(10 * MB, int((target - have) * 1.25 / PACKETS_PER_BYTE))
            log(f"transfer {attempt + 1}: {size // MB} MB each way over 2 subflows ...")
            t0 = time.perf_counter()
            run = lab.transfer(up=size, down=size, wait_subflows=2, timeout=900)
            log(f"  done in {time.perf_counter() - t0:.1f}s; client ok={run.client.get('ok')} "
                f"server ok={run.server.get('ok')}")
            for intf, path in run.pcaps.items():
                if intf in ("c1-eth0", "c1-eth1"):
                    parts.append(path)
                else:
                    path.unlink(missing_ok=True)  # the routers' and server's views: not needed
            out = subprocess.run(["mergecap", "-F", "pcap", "-w", str(merged), *map(str, parts)],
                                 capture_output=True, text=True, timeout=600)
            if out.returncode != 0:
                raise RuntimeError(f"mergecap failed: {out.stderr.strip()[-300:]}")
            have = pcap_stats(merged).frames
            log(f"  {have} packets so far")
            if have >= target:
                break
        else:
            notes.append(f"only {have} packets after 4 transfers (wanted {target})")
    finally:
        cleanup.run()
    for p in parts:
        p.unlink(missing_ok=True)
    if len(parts) > 2:
        notes.append(f"{len(parts) // 2} transfers merged")
    return merged, notes


@contextlib.contextmanager
def bench_run(name: str, pcap: Path | None, packets: int, keep: str | None,
              log: Callable[[str], None]) -> Iterator[tuple[Path, Path, list[str]]]:
    """One benchmark run: (scratch folder, the capture to measure, notes). The capture is `pcap`,
    or one made here (root) with at least `packets` packets and copied to `keep` if asked. The
    folder is removed afterwards and the run's namespace prefix released. A measurement that
    cannot complete prints why (one line for a capture that cannot be read) and is swallowed: a
    benchmark always exits 0; KeyboardInterrupt goes through, after the cleanup."""
    folder: Path | None = None
    try:
        if pcap is not None:
            folder = Path(tempfile.mkdtemp(prefix=f"mptcp-{name}-bench-"))
            yield folder, pcap, []
            return
        from conformance.net.names import run_tmpdir

        folder = run_tmpdir() / f"{name}-{os.getpid()}"
        folder.mkdir(parents=True, exist_ok=True)
        path, notes = make_capture(folder, packets, log)
        if keep:
            kept = Path(keep).resolve()
            shutil.copyfile(path, kept)
            notes.append(f"capture kept at {kept}")
        yield folder, path, notes
    except InputError as exc:  # a capture we cannot read: its one line says why
        print(f"benchmark could not complete: {exc}", file=sys.stderr)
    except Exception:  # a measurement that cannot run says why and still exits 0
        print("benchmark could not complete:\n" + traceback.format_exc(), file=sys.stderr)
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        if pcap is None:
            from conformance.net.names import release_run

            with contextlib.suppress(Exception):
                release_run()
