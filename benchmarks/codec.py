"""MPTCP option decoding speed on a bulk capture: our bulk decoder against our scapy classes and tshark.

The capture (made by benchmarks/bulk_capture.py, shared with checker.py): a kernel-to-kernel bulk
transfer over `two_path` with a second subflow (a join endpoint on the client's second interface),
both directions at once, captured by the Lab at its default snaplen; the client's two interfaces
(one subflow each) merged into one classic pcap with mergecap. Transfers are repeated until the
file holds at least --packets packets. It lives in a temporary folder under the run's tmpdir and
is deleted afterwards unless --keep. --pcap FILE measures an existing capture instead (no root needed).

Measured on the same file, in the same invocation, after one untimed read to warm the page cache:

  bulk     conformance.wire.bulk.iter_pcap, reading every Packet.options (each MPTCP option
           decoded into its fields); best of --repeat runs
  scapy    scapy's PcapReader and our option classes (conformance.wire.mptcp_options on each TCP
           layer): only the first --scapy-packets packets, the rate extrapolated to the file
  tshark   `tshark -n -r FILE -T fields -e tcp.options.mptcp.subtype -e ...` with the MPTCP fields
           the suite's oracle reads (conformance.observe.oracles), tshark's default preferences; options
           counted from the subtype column. A second tshark row turns MPTCP and TCP sequence
           analysis off (its fastest setting), for reference.

The goal is bulk >= 2x tshark (options per second); this is a measurement, it always exits 0.

    sudo .venv/bin/python benchmarks/codec.py [--packets N] [--keep [PATH]] [--repeat N]
    .venv/bin/python benchmarks/codec.py --pcap FILE
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bulk_capture import MB, bench_run

from conformance.wire.bulk import PcapStats, iter_pcap, scapy_fields

GOAL = 2.0


# --- the three decoders ------------------------------------------------------------------------

def run_bulk(path: Path) -> tuple[int, int, float]:
    """(packets, options, seconds) of iter_pcap with every option decoded."""
    t0 = time.perf_counter()
    packets = options = 0
    for pkt in iter_pcap(path):
        packets += 1
        options += len(pkt.options)
    return packets, options, time.perf_counter() - t0


def run_scapy(path: Path, limit: int) -> tuple[int, int, float, list]:
    """(packets, options, seconds, decoded) of scapy dissecting the first `limit` packets; decoded
    holds (frame, [(class name, fields)]) per TCP packet, for the equivalence check (untimed)."""
    from scapy.layers.inet import TCP
    from scapy.utils import PcapReader

    from conformance.wire import mptcp_options

    t0 = time.perf_counter()
    packets = options = 0
    kept = []
    with PcapReader(str(path)) as reader:
        for pkt in reader:
            packets += 1
            if TCP in pkt:
                opts = mptcp_options(pkt[TCP])
                options += len(opts)
                kept.append((packets, opts))
            if packets >= limit:
                break
    seconds = time.perf_counter() - t0
    decoded = [(n, [(type(o).__name__, scapy_fields(o)) for o in opts]) for n, opts in kept]
    return packets, options, seconds, decoded


def check_equivalence(path: Path, scapy_decoded: list) -> str:
    """Does the bulk decoder give the same options as scapy for the packets scapy dissected?"""
    want = dict(scapy_decoded)
    last = max(want, default=0)
    differ = seen = 0
    for pkt in iter_pcap(path):
        if pkt.frame > last:
            break
        seen += 1
        if want.get(pkt.frame) != pkt.options:
            differ += 1
    if differ or seen != len(want):
        return (f"MISMATCH: {differ} of {len(want)} TCP packets decode differently in bulk and scapy "
                f"(bulk saw {seen})")
    return (f"bulk and scapy decode the first {len(want)} TCP packets identically "
            f"({sum(len(o) for _, o in scapy_decoded)} MPTCP options)")


def tshark_fields() -> list[str]:
    from conformance.observe.oracles import tshark_fields as every_mptcp_field

    # The MPTCP option fields the oracle reads (tshark's derived token/IDSN/count need analysis);
    # the subtype first: options are counted from that column.
    subtype = "tcp.options.mptcp.subtype"
    return [subtype, *(f for f in every_mptcp_field() if f.startswith("tcp.options.mptcp.") and f != subtype)]


def run_tshark(path: Path, lean: bool) -> tuple[int, int, float]:
    """(packets, options, seconds) of tshark printing the MPTCP fields of every packet."""
    argv = ["tshark", "-n", "-r", str(path), "-T", "fields", "-E", "occurrence=a", "-E", "aggregator=,"]
    if lean:
        argv += ["-o", "mptcp.analyze_mptcp:FALSE", "-o", "tcp.analyze_sequence_numbers:FALSE",
                 "-o", "tcp.relative_sequence_numbers:FALSE"]
    for f in tshark_fields():
        argv += ["-e", f]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    packets = options = 0
    assert proc.stdout is not None
    for line in proc.stdout:  # counted while tshark runs, as a consumer of its output would
        packets += 1
        subtypes = line.split(b"\t", 1)[0].strip()
        if subtypes:
            options += subtypes.count(b",") + 1
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    rc = proc.wait()
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"tshark failed (exit {rc}): {err.strip()[-300:]}")
    return packets, options, seconds


# --- report ------------------------------------------------------------------------------------

def render(path: Path, stats: PcapStats, rows: list[dict], check: str, notes: list[str]) -> str:
    size = path.stat().st_size
    head = [f"capture: {path.name}: {stats.frames} packets ({stats.tcp} TCP, {stats.mptcp_options} MPTCP "
            f"options), {size / MB:.1f} MB, {stats.format}"]
    ref = next((r for r in rows if r["name"] == "tshark"), None)
    cols = ("decoder", "packets", "options", "seconds", "options/s", "vs tshark")
    widths = (34, 9, 9, 9, 12, 10)

    def line(cells):
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths,
                                                                                          strict=True)))

    out = [*head, "", line(cols), "-" * (sum(widths) + 2 * (len(widths) - 1))]
    for r in rows:
        r["rate"] = r["options"] / r["seconds"] if r["seconds"] else float("inf")
    for r in rows:
        rate = r["rate"]
        ratio = f"{rate / ref['rate']:.2f}x" if ref and ref.get("rate") else "-"
        out.append(line((r["label"], str(r["packets"]), str(r["options"]), f"{r['seconds']:.2f}",
                         f"{rate:,.0f}", ratio)))
    out.append("")
    for r in rows:
        if r.get("note"):
            out.append(f"{r['label']}: {r['note']}")
    bulk = next((r for r in rows if r["name"] == "bulk"), None)
    if bulk and ref and ref.get("rate"):
        ratio = bulk["rate"] / ref["rate"]
        verdict = "met" if ratio >= GOAL else "NOT met"
        out.append(f"goal: bulk decoder >= {GOAL:g}x tshark (options/s): {verdict} ({ratio:.2f}x)")
        lean = next((r for r in rows if r["name"] == "tshark-lean"), None)
        if lean and lean.get("rate"):
            out.append(f"      against tshark with MPTCP/TCP analysis off: {bulk['rate'] / lean['rate']:.2f}x")
        if bulk["options"] != ref["options"]:
            out.append(f"note: option counts differ: bulk {bulk['options']}, tshark {ref['options']}")
    out.append(f"check: {check}")
    out += [f"note: {n}" for n in notes]
    out += ["", "(a measurement, not a pass/fail: exit status is always 0)"]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pcap", type=Path, help="measure this capture instead of making one")
    parser.add_argument("--packets", type=int, default=500_000,
                        help="packets the capture must hold at least (default 500000)")
    parser.add_argument("--keep", nargs="?", const="codec-bulk.pcap", default=None, metavar="PATH",
                        help="keep the capture made, at PATH (default ./codec-bulk.pcap)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of the bulk decoder (best kept)")
    parser.add_argument("--scapy-packets", type=int, default=50_000,
                        help="packets scapy dissects; its rate is extrapolated (default 50000)")
    parser.add_argument("--no-lean-tshark", action="store_true", help="skip the second tshark row")
    args = parser.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.pcap is None and os.geteuid() != 0:
        print("benchmarks/codec.py: making a capture needs root (namespaces, veth, tcpdump); "
              "nothing measured (or pass --pcap FILE)")
        return 0
    with bench_run("codec", args.pcap, args.packets, args.keep, log) as (_, path, notes):
        stats = PcapStats()  # an untimed first pass: counts, and a warm page cache for every decoder alike
        for _ in iter_pcap(path, stats):
            pass
        rows: list[dict] = []
        log("bulk decoder ...")
        runs = [run_bulk(path) for _ in range(max(1, args.repeat))]
        best = min(runs, key=lambda r: r[2])
        rows.append({"name": "bulk", "label": "bulk (conformance.wire.bulk)", "packets": best[0],
                     "options": best[1], "seconds": best[2],
                     "note": f"best of {len(runs)} runs; median {statistics.median(r[2] for r in runs):.2f}s"})
        log("tshark ...")
        p, o, s = run_tshark(path, lean=False)
        rows.append({"name": "tshark", "label": "tshark -T fields (defaults)", "packets": p, "options": o,
                     "seconds": s, "note": f"{len(tshark_fields())} MPTCP fields, tshark's default preferences"})
        if not args.no_lean_tshark:
            log("tshark, analysis off ...")
            p, o, s = run_tshark(path, lean=True)
            rows.append({"name": "tshark-lean", "label": "tshark -T fields (analysis off)", "packets": p,
                         "options": o, "seconds": s,
                         "note": "mptcp.analyze_mptcp, tcp.analyze_sequence_numbers, relative seq off"})
        log(f"scapy (first {args.scapy_packets} packets) ...")
        p, o, s, decoded = run_scapy(path, args.scapy_packets)
        check = check_equivalence(path, decoded)
        rate = o / s if s else 0.0
        if p < stats.frames and rate:
            share = f"measured on the first {p} of {stats.frames} packets ({o} options in {s:.2f}s), " \
                    f"seconds extrapolated at that rate to the file's {stats.mptcp_options} options"
            rows.append({"name": "scapy", "label": "scapy (our classes), extrapolated", "packets": stats.frames,
                         "options": stats.mptcp_options, "seconds": stats.mptcp_options / rate, "note": share})
        else:
            rows.append({"name": "scapy", "label": "scapy (our classes)", "packets": p, "options": o,
                         "seconds": s, "note": "the whole file"})
        print(render(path, stats, rows, check, notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
