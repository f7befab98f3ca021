"""Passive checker speed and memory on a bulk capture: `check-pcap` against tshark's MPTCP analysis.

The capture: the one codec.py measures (made by benchmarks/bulk_capture.py), a kernel-to-kernel
bulk transfer over `two_path` with two subflows, both directions at once, the client's two
interfaces merged into one classic pcap; transfers are repeated until it holds at least --packets
packets (default 1,000,000). It lives in a temporary folder under the run's tmpdir and is deleted
afterwards unless --keep. --pcap FILE measures an existing capture instead (no root needed).

Measured on the same file, in the same invocation, after one untimed read to warm the page cache.
Each tool runs as a child process, timed from its start to its exit (start-up included); its peak
RSS is the child's own ru_maxrss (os.wait4), its CPU time user + system from the same rusage. A
tiny launcher process starts it and waits for it, so that this process's own memory (Linux adds
the forking process's to the child's ru_maxrss) does not hide the tool's:

  ours     `mptcp-conformance check-pcap FILE --json` (the venv's console script): rebuilds every
           connection (keys, tokens, IDSNs, joins by token with HMACs, DSS, ADD_ADDR, DATA_FIN,
           fallback) and judges every passive rule; exit 0 or 1 (a rule failed) both count as a
           measurement, its JSON is read back for a one-line summary
  tshark   `tshark -n -r FILE -o mptcp.analyze_mptcp:TRUE -o mptcp.analyze_mappings:TRUE
           -o mptcp.intersubflows_retransmission:TRUE -q -z expert`: tshark's MPTCP analysis
           with every MPTCP preference of tshark 4.0 on (subflows mapped to their connection, DSS
           mappings checked against the data, retransmissions across subflows), TCP sequence
           analysis at its default (on), and only the expert summary printed

On the full file each tool runs --repeat times, interleaved; the best time is kept, the peak RSS
is the highest seen. Then both run once on a prefix holding the first quarter of the packets
(`editcap -r`, same format), for memory flatness: peak RSS at 1/4 against the full file.

Goals: tshark time / ours >= 2x on the full file, and our peak RSS flat in the number of packets
(full / quarter <= 1.1: check-pcap streams, it does not load the capture). This is a measurement:
it always exits 0, except 2 for bad arguments or an unreadable --pcap file (one line).

    sudo .venv/bin/python benchmarks/checker.py [--packets N] [--keep [PATH]] [--repeat N]
    .venv/bin/python benchmarks/checker.py --pcap FILE [--repeat N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bulk_capture import MB, bench_run

from conformance.errors import InputError
from conformance.wire.bulk import PcapStats, iter_pcap

GOAL = 2.0  # tshark seconds / ours
FLAT = 1.1  # our peak RSS, full file / first quarter
PREFIX_SHARE = 4  # the prefix holds 1/PREFIX_SHARE of the packets
TSHARK_PREFS = ("mptcp.analyze_mptcp:TRUE", "mptcp.analyze_mappings:TRUE",
                "mptcp.intersubflows_retransmission:TRUE")
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {n}")
    return n


# --- the two tools -----------------------------------------------------------------------------

@dataclass
class Run:
    tool: str  # "ours" | "tshark"
    part: str  # "full" | "1/4"
    seconds: float
    cpu: float  # user + system seconds of the child
    rss_kib: int  # the child's peak resident set (ru_maxrss, KiB on Linux)
    rc: int
    out: Path  # its stdout


def ours_argv(path: Path) -> list[str]:
    """check-pcap as a user runs it: the venv's console script, else the module."""
    script = Path(sys.executable).parent / "mptcp-conformance"
    head = [str(script)] if script.exists() else [sys.executable, "-m", "conformance.cli"]
    return [*head, "check-pcap", str(path), "--json"]


def tshark_argv(path: Path) -> list[str]:
    argv = ["tshark", "-n", "-r", str(path)]
    for pref in TSHARK_PREFS:
        argv += ["-o", pref]
    return [*argv, "-q", "-z", "expert"]


# The tool is started by a small launcher (a bare interpreter: -I -S, a few MiB) that spawns it,
# waits for it with wait4 and writes its exit code, rusage and wall time to a file. Not by this
# process: Linux folds the memory of the process that forks (vfork: its peak) into the child's
# ru_maxrss at exec, and this one holds the decoder and, after making the capture, whatever the
# Lab's transfer left (its oracle cross-check decodes every frame twice: GiBs on these captures),
# which would hide the tool's own peak.
LAUNCHER = """
import os, sys, time
report, argv = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
try:
    pid = os.posix_spawnp(argv[0], argv, os.environ)
except OSError as exc:
    sys.exit(f"cannot start {argv[0]}: {exc}")
_, status, ru = os.wait4(pid, 0)
seconds = time.perf_counter() - t0
with open(report, "w") as f:
    f.write(f"{os.waitstatus_to_exitcode(status)} {ru.ru_maxrss} {ru.ru_utime + ru.ru_stime} {seconds}")
"""


def measure(tool: str, part: str, argv: list[str], folder: Path, n: int) -> Run:
    """Run argv (through LAUNCHER), stdout and stderr to files in `folder`: its wall time from
    spawn to exit, CPU time and peak RSS."""
    out, err, report = (folder / f"{tool}-{n}.{ext}" for ext in ("out", "err", "rusage"))
    with open(out, "wb") as fout, open(err, "wb") as ferr:
        # Its own session: Ctrl-C reaches this process only, which then stops the launcher's
        # process group (the launcher and the tool, started by us) by its ID.
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", LAUNCHER, str(report), *argv],
                                stdin=subprocess.DEVNULL, stdout=fout, stderr=ferr, start_new_session=True)
        try:
            proc.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    try:
        rc_text, rss, cpu, seconds = report.read_text().split()
    except (OSError, ValueError):
        tail = err.read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"{tool} on the {part} file did not run: {' | '.join(tail)}") from None
    rc = int(rc_text)
    # ours: 0, or 1 (a rule failed) with its JSON; 1 without JSON is a crash
    bad = (rc not in (0, 1) or not _json_report(out)) if tool == "ours" else rc != 0
    if bad:
        tail = err.read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"{tool} on the {part} file failed (exit {rc}): {' | '.join(tail)}")
    return Run(tool, part, float(seconds), float(cpu), int(rss), rc, out)


def _json_report(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and "judgments" in doc else None


def write_prefix(src: Path, dst: Path, packets: int, fmt: str) -> None:
    """The first `packets` records of `src`, in its own format."""
    out = subprocess.run(["editcap", "-F", fmt, "-r", str(src), str(dst), f"1-{packets}"],
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"editcap failed: {out.stderr.strip()[-300:]}")


# --- what each tool found (a sanity line, not timed) ---------------------------------------------

def ours_summary(run: Run) -> str:
    doc = _json_report(run.out) or {}
    conns = doc.get("connections", [])
    judgments = doc.get("judgments", [])
    outcomes: dict[str, int] = {}
    for j in judgments:
        outcomes[j["outcome"]] = outcomes.get(j["outcome"], 0) + 1
    subflows = sum(c.get("subflows", 0) for c in conns)
    tally = ", ".join(f"{v} {k}" for k, v in sorted(outcomes.items()))
    return (f"{len(conns)} connection(s), {subflows} subflow(s), {len(judgments)} judgment(s)"
            f"{f' ({tally})' if tally else ''}, exit {run.rc}")


def tshark_summary(run: Run) -> str:
    """The expert summary's section totals, e.g. 'Warns 6336, Notes 11, Chats 13', and the
    MPTCP-specific entries (tshark's MPTCP analysis files them under protocol TCP)."""
    sections, mptcp = [], []
    for line in run.out.read_text(errors="replace").splitlines():
        s = line.strip()
        if s.endswith(")") and "(" in s and not s[0].isdigit():
            sections.append(s.replace(" (", " ").rstrip(")"))
        elif s[:1].isdigit() and any(w in s for w in ("mapping", "MPTCP", "DSS", "subflow")):
            count, rest = s.split(None, 1)
            mptcp.append(f"{rest.split(None, 2)[-1]}: {count}")
    text = ", ".join(sections) or "no expert entries"
    return text + (f"; MPTCP entries: {', '.join(mptcp)}" if mptcp else "")


# --- report ------------------------------------------------------------------------------------

def mib(kib: int) -> str:
    return f"{kib / 1024:,.1f} MiB"


def render(path: Path, stats: PcapStats, prefix_frames: int, full: dict[str, list[Run]],
           quarter: dict[str, Run], notes: list[str]) -> str:
    size = path.stat().st_size
    out = [f"capture: {path.name}: {stats.frames:,} packets ({stats.tcp:,} TCP, {stats.mptcp_options:,} MPTCP "
           f"options), {size / MB:,.1f} MB, {stats.format}; prefix: the first {prefix_frames:,} packets "
           f"(1/{PREFIX_SHARE})"]
    cols = ("tool", "file", "packets", "seconds", "packets/s", "CPU s", "peak RSS")
    widths = (31, 4, 10, 8, 10, 8, 12)

    def line(cells):
        return "  ".join(c.rjust(w) if i > 1 else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    labels = {"ours": "ours (check-pcap --json)", "tshark": "tshark (MPTCP analysis, expert)"}
    out += ["", line(cols), "-" * (sum(widths) + 2 * (len(widths) - 1))]
    best = {tool: min(runs, key=lambda r: r.seconds) for tool, runs in full.items()}
    peak = {tool: max(r.rss_kib for r in runs) for tool, runs in full.items()}
    for tool in ("ours", "tshark"):
        b = best[tool]
        out.append(line((labels[tool], "full", f"{stats.frames:,}", f"{b.seconds:.2f}",
                         f"{stats.frames / b.seconds:,.0f}", f"{b.cpu:.2f}", mib(peak[tool]))))
        q = quarter[tool]
        out.append(line((labels[tool], f"1/{PREFIX_SHARE}", f"{prefix_frames:,}", f"{q.seconds:.2f}",
                         f"{prefix_frames / q.seconds:,.0f}", f"{q.cpu:.2f}", mib(q.rss_kib))))
    out.append("")
    for tool in ("ours", "tshark"):
        runs = full[tool]
        if len(runs) > 1:
            times = [r.seconds for r in runs]
            out.append(f"{labels[tool]}: best of {len(runs)} runs on the full file; median "
                       f"{statistics.median(times):.2f}s, worst {max(times):.2f}s")
    ratio = best["tshark"].seconds / best["ours"].seconds
    out.append(f"goal: check-pcap >= {GOAL:g}x faster than tshark's MPTCP analysis: "
               f"{'met' if ratio >= GOAL else 'NOT met'} (tshark/ours = {ratio:.2f}x; CPU time "
               f"{best['tshark'].cpu / best['ours'].cpu:.2f}x)")
    growth = peak["ours"] / quarter["ours"].rss_kib
    out.append(f"goal: check-pcap's peak RSS flat in the packets (full / first quarter <= {FLAT:g}): "
               f"{'met' if growth <= FLAT else 'NOT met'} ({mib(quarter['ours'].rss_kib)} -> "
               f"{mib(peak['ours'])}, x{growth:.2f})")
    out.append(f"      tshark for reference: {mib(quarter['tshark'].rss_kib)} -> {mib(peak['tshark'])}, "
               f"x{peak['tshark'] / quarter['tshark'].rss_kib:.2f}")
    out.append(f"ours found: {ours_summary(best['ours'])}")
    out.append(f"tshark found: {tshark_summary(best['tshark'])}")
    out += [f"note: {n}" for n in notes]
    out += ["", "(a measurement, not a pass/fail: exit status is always 0)"]
    return "\n".join(out)


# --- main --------------------------------------------------------------------------------------

def _terminate(signum, frame):  # SIGTERM cleans up like Ctrl-C
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="benchmarks/checker.py", description=__doc__.splitlines()[0])
    parser.add_argument("--pcap", type=Path, help="measure this capture instead of making one")
    parser.add_argument("--packets", type=_positive, default=1_000_000,
                        help="packets the capture must hold at least (default 1000000)")
    parser.add_argument("--keep", nargs="?", const="checker-bulk.pcap", default=None, metavar="PATH",
                        help="keep the capture made, at PATH (default ./checker-bulk.pcap)")
    parser.add_argument("--repeat", type=_positive, default=1,
                        help="timed runs of each tool on the full file, interleaved (best kept; default 1)")
    args = parser.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    notes: list[str] = []
    stats = PcapStats()
    if args.pcap is not None:  # a bad file is bad input: one line, exit 2, before anything is made
        try:
            for _ in iter_pcap(args.pcap, stats):  # also the untimed read that warms the page cache
                pass
        except InputError as exc:
            print(f"{parser.prog}: error: --pcap: {exc}", file=sys.stderr)
            return EXIT_USAGE
        if stats.frames == 0:
            print(f"{parser.prog}: error: --pcap: {args.pcap}: no packets to measure", file=sys.stderr)
            return EXIT_USAGE
        if args.keep:
            notes.append("--keep ignored: nothing was made (--pcap)")
    elif os.geteuid() != 0:
        print("benchmarks/checker.py: making a capture needs root (namespaces, veth, tcpdump); "
              "nothing measured (or pass --pcap FILE)")
        return 0
    for tool in ("tshark", "editcap") + (("mergecap",) if args.pcap is None else ()):
        if shutil.which(tool) is None:
            print(f"benchmarks/checker.py: {tool} is not installed; nothing measured (ci/setup.sh installs it)")
            return 0

    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _terminate)
    try:
        with bench_run("checker", args.pcap, args.packets, args.keep, log) as (folder, path, made_notes):
            notes += made_notes
            if args.pcap is None:
                for _ in iter_pcap(path, stats):  # the untimed read that warms the page cache
                    pass
            load = os.getloadavg()[0]
            if load > 0.5:
                notes.append(f"load average {load:.2f} on {os.cpu_count()} CPU(s) when timing began: "
                             "other work shares the machine")

            prefix = folder / f"prefix.{stats.format}"
            prefix_frames = max(1, stats.frames // PREFIX_SHARE)
            write_prefix(path, prefix, prefix_frames, stats.format)
            for _ in iter_pcap(prefix):  # warm too
                pass

            full: dict[str, list[Run]] = {"ours": [], "tshark": []}
            argvs = {"ours": ours_argv, "tshark": tshark_argv}
            n = 0
            for i in range(args.repeat):
                order = ("ours", "tshark") if i % 2 == 0 else ("tshark", "ours")
                for tool in order:
                    n += 1
                    log(f"{tool} on the full file ({i + 1}/{args.repeat}) ...")
                    full[tool].append(measure(tool, "full", argvs[tool](path), folder, n))
            quarter: dict[str, Run] = {}
            for tool in ("ours", "tshark"):
                n += 1
                log(f"{tool} on the first 1/{PREFIX_SHARE} ...")
                quarter[tool] = measure(tool, f"1/{PREFIX_SHARE}", argvs[tool](prefix), folder, n)
            print(render(path, stats, prefix_frames, full, quarter, notes))
    except KeyboardInterrupt:
        print("benchmarks/checker.py: interrupted; nothing measured", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
