"""Guest kernels (conformance/endpoints/guest): boot time, goodput, guest-router delay accuracy,
and the wall time of the cross-version matrix, each against a baseline of the same invocation.

  boot      boot-to-ready (qemu start to the agent's first answer) of each kernel, under TCG
            (--boots times) and under KVM where detection says it boots; against the goals
            (TCG <= 5 s, KVM <= 1.5 s).
  goodput   one 20 MB transfer client -> server over two_path, the server played by the local
            kernel (baseline), then by each guest; ratio guest/local.
  delay     two_path with a guest router on path 1 (netem in the guest) and the host's delay
            fallback on path 2, delay=10ms per link (40 ms round trip): ping RTTs over each path
            against the configured value (goal: error at most 1 ms).
  matrix    (--matrix) the matrix pair linux x linux (baseline) and linux x each guest, both
            roles: wall time of each pair and its ratio to the baseline.

This is a measurement; it always exits 0.

    sudo .venv/bin/python benchmarks/guests.py [--kernels 6.1,6.12] [--boots 3] [--matrix]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from conformance.endpoints.guest import endpoint, kernels, vm
from conformance.lab import Lab
from conformance.net.cleanup import Cleanup
from conformance.net.names import release_run
from conformance.net.registry import make_topology
from conformance.proc import run

GOALS = {"tcg": 5.0, "kvm": 1.5}
DELAY_MS = 10.0


def boot_times(versions: list[str], boots: int) -> None:
    print("== boot to ready")
    for version in versions:
        kernel = kernels.fetch(version)
        accel = vm.accelerator(kernel)
        why = (vm.accelerator_known(kernel.release) or {}).get("why", "")
        print(f"{kernel.release}: detected accelerator {accel} ({why[:120]})")
        for mode in ("tcg", "kvm"):
            if mode == "kvm" and accel != "kvm":
                print(f"  kvm: cannot boot this kernel here; goal {GOALS['kvm']} s not measurable")
                continue
            # A server takes one NIC, a multihomed client two (a guest boots with its node's count).
            for nics in (1, 2):
                times = []
                for i in range(boots):
                    with vm.Guest(kernel, f"bench{i}", accel=mode, nics=nics) as guest:
                        times.append(guest.boot_seconds or 0.0)
                med = statistics.median(times)
                met = "met" if med <= GOALS[mode] else "NOT met"
                print(f"  {mode}, {nics} NIC(s): median {med:.2f} s (min {min(times):.2f}, max {max(times):.2f}, "
                      f"n={boots}); goal {GOALS[mode]} s: ratio {med / GOALS[mode]:.2f} ({met})")


def _transfer(server: str, size: int, folder: Path) -> float:
    cleanup = Cleanup()
    try:
        roles = {"client": "linux", "server": server}
        lab = Lab(make_topology("two_path"), folder, cleanup, implementations=roles)
        t = lab.transfer(up=size, down=0, timeout=120)
        if not t.server.get("ok"):
            raise RuntimeError(f"transfer to {server} not intact: {t.server}")
        return size * 8 / t.client["duration_s"] / 1e6
    finally:
        cleanup.run()


def goodput(versions: list[str], size: int) -> None:
    print(f"== goodput: {size / 1e6:.0f} MB client -> server over two_path (one subflow), Mbit/s")
    with tempfile.TemporaryDirectory(prefix="mptcp-bench-guests-") as tmp:
        base = _transfer("linux", size, Path(tmp) / "local")
        print(f"  local kernel server (baseline): {base:.0f}")
        for version in versions:
            got = _transfer(f"linux-{version}-kvm", size, Path(tmp) / version)
            print(f"  guest {version} server: {got:.0f}  ratio guest/local {got / base:.3f}")


def _rtts(lab: Lab, src: str, count: int) -> list[float]:
    dst = lab.topo.addresses("s1", 4)[0]
    out = run(["ping", "-n", "-c", str(count), "-i", "0.05", "-I", src, dst], netns=lab.net.netns("c1"),
              timeout=count + 30, check=False).stdout
    return [float(m) for m in re.findall(r"time=([\d.]+) ms", out)]


def delay_accuracy(version: str, count: int) -> None:
    print(f"== delay: two_path, delay={DELAY_MS:g}ms per link (configured RTT {4 * DELAY_MS:g} ms); path 1 "
          f"through a {version} guest router (netem), path 2 through the host's delay fallback")
    with tempfile.TemporaryDirectory(prefix="mptcp-bench-guests-") as tmp:
        cleanup = Cleanup()
        try:
            lab = Lab(make_topology("two_path", delay=f"{DELAY_MS:g}ms", guest_router=version), Path(tmp), cleanup)
            want = 4 * DELAY_MS
            for path, src in ((f"guest router ({version}, netem)", lab.topo.addresses("c1", 4)[0]),
                              ("host delay fallback", lab.topo.addresses("c1", 4)[1])):
                rtts = _rtts(lab, src, count)
                if not rtts:
                    print(f"  {path}: no replies")
                    continue
                rtts.sort()
                p99 = rtts[min(len(rtts) - 1, int(0.99 * len(rtts)))]
                err = statistics.mean(rtts) - want
                print(f"  {path}: mean {statistics.mean(rtts):.2f} ms (error {err:+.2f} ms), median "
                      f"{statistics.median(rtts):.2f}, p99 {p99:.2f} (p99 error {p99 - want:+.2f}), "
                      f"n={len(rtts)}; goal |error| <= 1 ms: {'met' if abs(err) <= 1 else 'NOT met'}")
        finally:
            cleanup.run()


def matrix_times(versions: list[str]) -> None:
    print("== cross-version matrix: wall time per pair")
    pairs = [("linux", "linux")] + [p for v in versions for p in (("linux", f"linux-{v}-kvm"),
                                                                   (f"linux-{v}-kvm", "linux"))]
    base = None
    with tempfile.TemporaryDirectory(prefix="mptcp-bench-matrix-") as tmp:
        for client, server in pairs:
            t0 = time.monotonic()
            subprocess.run([sys.executable, "-m", "conformance.cli", "matrix", "--client", client, "--server",
                            server, "--out", str(Path(tmp) / f"{client}--{server}")],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
            took = time.monotonic() - t0
            base = base or took
            summary = json.loads((Path(tmp) / f"{client}--{server}" / "matrix.json").read_text())
            cells = [c for p in summary.get("pairs", []) for c in p.get("scenarios", {}).values()]
            print(f"  {client} x {server}: {took:.0f} s, ratio to linux x linux {took / base:.2f}, "
                  f"{len(cells)} scenario cells")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", default="6.1,6.12", help="Debian kernel versions (default 6.1,6.12)")
    ap.add_argument("--boots", type=int, default=3)
    ap.add_argument("--size", type=int, default=20_000_000)
    ap.add_argument("--pings", type=int, default=200)
    ap.add_argument("--matrix", action="store_true", help="also time the cross-version matrix (long)")
    args = ap.parse_args()
    versions = [v for v in args.kernels.split(",") if v]
    try:
        boot_times(versions, args.boots)
        goodput(versions, args.size)
        delay_accuracy(versions[-1], args.pings)
        if args.matrix:
            matrix_times(versions)
    except Exception:
        traceback.print_exc()
    finally:
        endpoint.shutdown()
        release_run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
