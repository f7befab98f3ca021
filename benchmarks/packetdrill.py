"""packetdrill scripts: wall time of our engine against the real MPTCP packetdrill on the same
scripts, in the same invocation (goal: python / packetdrill <= 2x).

For every script of the corpus (cases/packetdrill) that both engines run, in the ipv4 variant
and strict mode, each engine runs it --runs times, alternating; a run is timed from namespace
creation to its removal (engines.run), the script's own waits included for both. Printed: the
median per script and engine, their ratio, and the ratio of the sums. Without a usable real
tool (PATH or $PACKETDRILL) only our engine's per-script times are printed. The verdicts of
the two engines are printed too: they must be equal.

This is a measurement; it always exits 0.

    sudo .venv/bin/python benchmarks/packetdrill.py [--runs 3] [--variant ipv4] [SCRIPT_OR_DIR ...]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from conformance.net.names import release_run
from conformance.packetdrill import engines
from conformance.packetdrill.script import load
from conformance.packetdrill.variants import for_script

CORPUS = Path(__file__).resolve().parents[1] / "cases" / "packetdrill"
GOAL = 2.0


def timed(script, variant: str, engine: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    result = engines.run(script, variant, engine, "strict")
    return time.perf_counter() - t0, result.verdict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scripts", nargs="*", default=[str(CORPUS)])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--variant", default="ipv4")
    args = ap.parse_args()
    paths = [q for p in map(Path, args.scripts) for q in (sorted(p.rglob("*.pkt")) if p.is_dir() else [p])]
    binary, why = engines.packetdrill_binary()
    print(f"real packetdrill: {binary or 'none (' + why + ')'}; {args.runs} run(s) per script and engine, "
          f"variant {args.variant}, strict")
    totals = {"python": 0.0, "packetdrill": 0.0}
    differ = 0
    print(f"{'script':60} {'python s':>9} {'pd s':>8} {'ratio':>6}  verdicts")
    for path in paths:
        if args.variant not in for_script(path):
            continue  # a *v6.pkt script in an ipv4 run, say
        script = load(path)
        both = binary is not None and (not script.engines or "packetdrill" in script.engines)
        names = ["python", "packetdrill"] if both else ["python"]
        times: dict[str, list[float]] = {n: [] for n in names}
        verdicts: dict[str, set[str]] = {n: set() for n in names}
        for _ in range(args.runs):
            for name in names:
                seconds, verdict = timed(script, args.variant, name)
                times[name].append(seconds)
                verdicts[name].add(verdict)
        med = {n: statistics.median(v) for n, v in times.items()}
        label = str(path.relative_to(CORPUS) if path.is_relative_to(CORPUS) else path)
        if both:
            totals["python"] += med["python"]
            totals["packetdrill"] += med["packetdrill"]
            same = verdicts["python"] == verdicts["packetdrill"]
            differ += not same
            print(f"{label:60} {med['python']:9.3f} {med['packetdrill']:8.3f} "
                  f"{med['python'] / med['packetdrill']:6.2f}  python {'/'.join(sorted(verdicts['python']))}, "
                  f"packetdrill {'/'.join(sorted(verdicts['packetdrill']))}{'' if same else '  <- DIFFER'}")
        else:
            note = "" if binary is None else f"  ({script.engines_why[:60]})"
            print(f"{label:60} {med['python']:9.3f} {'-':>8} {'-':>6}  python "
                  f"{'/'.join(sorted(verdicts['python']))}{note}")
    if totals["packetdrill"]:
        ratio = totals["python"] / totals["packetdrill"]
        print(f"sum of medians: python {totals['python']:.2f} s, packetdrill {totals['packetdrill']:.2f} s: "
              f"ratio {ratio:.2f} (goal <= {GOAL}: {'met' if ratio <= GOAL else 'NOT met'}); "
              f"verdicts differ on {differ} script(s)")
    release_run()


if __name__ == "__main__":
    main()
