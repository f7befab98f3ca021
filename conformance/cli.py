"""The `mptcp-conformance` command: doctor, run, matrix, check-pcap, pkt, guest, report.

Exit codes: 0 all judged requirements hold, 1 a required (MUST-class) one failed, 2 environment or
input error (one line naming the input and the place), 3 (run, report) only our oracles disagreed."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

from conformance import __version__

CASES_DIR = Path(__file__).resolve().parents[1] / "cases"
EXIT_OK, EXIT_FAIL, EXIT_ENV = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (bad input)
        self.exit(EXIT_ENV, f"{self.prog}: error: {message}\n")


def _run(args: argparse.Namespace, extra: list[str]) -> int:
    import pytest

    folder = Path(args.report or Path("reports") / dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ"))
    # The progress bar and its summary table replace pytest's own terminal output; failures are
    # in the report (report.md, report.html), which the last line names.
    # (pyproject's addopts carry terminal options, so they are replaced, keeping --strict-markers.)
    argv = [str(CASES_DIR), "-p", "no:cacheprovider", "--mptcp-report", str(folder), "--mptcp-progress",
            "-o", "addopts=--strict-markers", "-p", "no:terminal"]
    if args.jobs and args.jobs > 1:
        argv += ["-n", str(args.jobs)]
    for fam in args.family or []:
        argv += ["--mptcp-family", fam]
    if args.k:
        argv += ["-k", args.k]
    rc = pytest.main(argv + extra)
    # pytest: 0 all passed, 1 some failed, 5 none collected, 2-4 usage/internal errors.
    if int(rc) not in (0, 1):
        return EXIT_ENV
    print(f"mptcp-conformance run: report in {folder}/ (report.html, report.md, results.json, junit.xml)")
    return _judged(folder / "results.json", args.strict)


def _judged(results_json: Path, strict: bool) -> int:
    """The run's exit code from its results (writers.exit_code)."""
    from conformance.errors import InputError
    from conformance.report.model import RunResults
    from conformance.report.writers import exit_code
    from conformance.requirements import load_catalogue

    try:
        return exit_code(RunResults.read_json(results_json), load_catalogue(), strict=strict)
    except InputError as exc:
        print(f"mptcp-conformance: {exc}", file=sys.stderr)
        return EXIT_ENV


def _report(args: argparse.Namespace) -> int:
    from conformance.errors import InputError
    from conformance.report.model import RunResults
    from conformance.report.writers import write_all
    from conformance.requirements import load_catalogue

    src = Path(args.results)
    try:
        results = RunResults.read_json(src)
        paths = write_all(results, load_catalogue(), Path(args.out or src.parent))
    except InputError as exc:
        print(f"mptcp-conformance report: {exc}", file=sys.stderr)
        return EXIT_ENV
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return _judged(paths["json"], args.strict)


def _matrix(args: argparse.Namespace) -> int:
    import json

    from conformance.errors import InputError
    from conformance.matrix import aggregate, load_matrix, pair_name, run_pair
    from conformance.report.model import RunResults
    from conformance.report.writers import exit_code
    from conformance.requirements import load_catalogue

    try:
        matrix = load_matrix(Path(args.file)) if args.file else load_matrix()
        scenarios = matrix.select(args.cases)
        pairs = matrix.pairs(args.client, args.server)
        if args.list_pairs:
            print(json.dumps([{"client": c, "server": s} for c, s in pairs]))
            return EXIT_OK
        out = Path(args.out)
        if args.merge:
            folders = [Path(f) for f in args.merge]
        else:
            from rich.console import Console

            console = Console(stderr=True)
            folders = []
            for i, (client, server) in enumerate(pairs, 1):
                console.rule(f"pair {i}/{len(pairs)}: client {client}, server {server}")
                rc = run_pair(matrix, client, server, scenarios, out, families=args.family, extra=args.pytest_args)
                if rc not in (0, 1):
                    console.print(f"[red]pytest exited {rc} for {pair_name(client, server)}[/]")
                folders.append(out / pair_name(client, server))
        missing = [f for f in folders if not (f / "results.json").is_file()]
        if missing:
            raise InputError(f"{missing[0]}: no results.json (the pair did not run)")
        data = aggregate(matrix, scenarios, folders, out)
        catalogue = load_catalogue()
        codes = {exit_code(RunResults.read_json(f / "results.json"), catalogue, strict=args.strict)
                 for f in folders}
    except InputError as exc:
        print(f"mptcp-conformance matrix: {exc}", file=sys.stderr)
        return EXIT_ENV
    _print_matrix(data)
    print(f"mptcp-conformance matrix: {out / 'matrix.html'} ({len(folders)} pairs)")
    for code in (EXIT_FAIL, EXIT_ENV, 3):
        if code in codes:
            return code
    return EXIT_OK


def _print_matrix(data: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from conformance.matrix import ABBREVIATION

    style = {"pass": "green", "fail": "red", "error": "magenta", "oracle-disagreement": "yellow",
             "unsupported": "cyan", "skip": "blue", "not-run": "dim"}
    table = Table(title="interop matrix (rows: client, columns: server; one letter a scenario)")
    table.add_column("client \\ server")
    for server in data["servers"]:
        table.add_column(server)
    pairs = {(p["client"], p["server"]): p for p in data["pairs"]}
    for client in data["clients"]:
        row = []
        for server in data["servers"]:
            pair = pairs.get((client, server))
            row.append(" ".join(f"[{style[c['outcome']]}]{c['scenario']}:{ABBREVIATION[c['outcome']]}[/]"
                                for c in pair["cells"]) if pair else "-")
        table.add_row(client, *row)
    Console().print(table)


def _check_pcap(args: argparse.Namespace) -> int:
    import json

    from conformance.errors import CommandError, InputError
    from conformance.observe.rules import FAIL, check
    from conformance.requirements import load_catalogue

    catalogue = load_catalogue()
    only = set(args.only.split(",")) if args.only else None
    if only:
        unknown = sorted(only - set(catalogue.by_id))
        if unknown:
            print(f"mptcp-conformance check-pcap: --only: unknown requirement ID(s) {', '.join(unknown)}",
                  file=sys.stderr)
            return EXIT_ENV
    try:
        conns, judgments = check(args.pcap, complete=args.complete)
    except InputError as exc:
        print(f"mptcp-conformance check-pcap: {exc}", file=sys.stderr)
        return EXIT_ENV
    theirs = []
    if args.tshark:
        from conformance.observe.tshark_analysis import compare_judgments

        try:
            theirs = compare_judgments(args.pcap, judgments)
        except (InputError, CommandError) as exc:
            print(f"mptcp-conformance check-pcap: --tshark: {exc}", file=sys.stderr)
            return EXIT_ENV
    if only:
        judgments = [j for j in judgments if j.rid in only]
        theirs = [d for d in theirs if d.rid in only]
    failed = [j for j in judgments if j.outcome == FAIL]
    required_failed = [j for j in failed if catalogue[j.rid].required or args.strict]
    if args.json:
        print(json.dumps({
            "captures": [str(p) for p in args.pcap],
            "connections": [{"syn": str(c.syn), "version": c.version, "fallback": c.fallback,
                             "checksum": c.checksum, "subflows": len(c.subflows),
                             "tokens": [f"{t:08x}" if t is not None else None for t in (c.token(0), c.token(1))]}
                            for c in conns],
            "judgments": [{"requirement": j.rid, "level": catalogue[j.rid].level, "outcome": j.outcome,
                           "connection": j.connection, "sentence": j.sentence,
                           "frames": [str(w) for w in j.where]} for j in judgments],
            **({"tshark_disagreements": [{"requirement": d.rid, "connection": d.connection, "tshark": d.tshark,
                                          "ours": d.ours, "outcome": d.outcome,
                                          "frames": [str(w) for w in d.frames]} for d in theirs]}
               if args.tshark else {}),
        }, indent=2))
    else:
        for i, c in enumerate(conns):
            state = f"fallback: {c.fallback}" if c.fallback else f"MPTCP v{c.version}"
            print(f"connection {i}: {c.syn}, {state}, {len(c.subflows)} subflow(s)")
            for j in judgments:
                if j.connection == i:
                    print(f"  {catalogue[j.rid].level:<9} {j}")
        for d in theirs:
            print(f"tshark disagrees: {d}")
        print(f"{len(conns)} connection(s), {len(judgments)} judgment(s), {len(failed)} failed"
              + (f", {len(theirs)} tshark disagreement(s)" if args.tshark else ""))
    return EXIT_FAIL if required_failed or theirs else EXIT_OK


def _guest(args: argparse.Namespace) -> int:
    import json

    from conformance.endpoints.guest import kernels
    from conformance.endpoints.guest.vm import Guest, oopses
    from conformance.errors import HarnessError

    try:
        kernel = kernels.fetch(args.version)
        with Guest(kernel, "cli", accel=None if args.accel == "auto" else args.accel) as guest:
            info = {"version": args.version, "package": f"{kernel.package} {kernel.package_version}",
                    "deb_sha256": kernel.sha256, "release": guest.uname(), "accelerator": guest.accel,
                    "boot_to_ready_s": round(guest.boot_seconds or 0, 3),
                    "mptcp_sysctls": sorted(guest.sh("ls /proc/sys/net/mptcp").split()),
                    "console_warnings": len(oopses(guest.console_text()))}
    except (HarnessError, ValueError) as exc:
        print(f"mptcp-conformance guest {args.version}: {exc}", file=sys.stderr)
        return EXIT_ENV
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:>18}: {' '.join(value) if isinstance(value, list) else value}")
    return EXIT_OK


def _pkt(args: argparse.Namespace) -> int:
    import json
    import os

    from conformance.errors import InputError
    from conformance.packetdrill import engines
    from conformance.packetdrill.script import load
    from conformance.packetdrill.variants import for_script

    paths: list[Path] = []
    for item in args.script:
        p = Path(item)
        paths += sorted(p.rglob("*.pkt")) if p.is_dir() else [p]
    try:
        if not paths:
            raise InputError(f"{', '.join(args.script)}: no .pkt scripts there")
        scripts = [load(p) for p in paths]  # every script parses before any runs
        engine = engines.resolve_engine(args.engine)
        if engine == "packetdrill" and engines.packetdrill_binary()[0] is None:
            raise InputError(f"--engine packetdrill: {engines.packetdrill_binary()[1]}")
        if os.geteuid() != 0:
            raise InputError("pkt: running a script needs root (a network namespace and a TUN device per run)")
    except InputError as exc:
        print(f"mptcp-conformance pkt: {exc}", file=sys.stderr)
        return EXIT_ENV
    results = []
    for script in scripts:
        for variant in for_script(script.path, args.variant):
            r = engines.run(script, variant, engine, args.mode)
            results.append(r)
            if not args.json:
                print(r.details() if r.verdict != "pass" or r.tolerated else r.headline(), flush=True)
    if args.json:
        print(json.dumps([r.to_json() for r in results], indent=2))
    else:
        counts = {v: sum(r.verdict == v for r in results) for v in ("pass", "fail", "error", "skip")}
        print(f"{len(results)} run(s): " + ", ".join(f"{n} {v}" for v, n in counts.items() if n))
    if any(r.verdict == "error" for r in results):
        return EXIT_ENV
    return EXIT_FAIL if any(r.verdict == "fail" for r in results) else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    ap = _Parser(prog="mptcp-conformance", description="RFC 8684 (MPTCP) conformance suite")
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)
    doc = sub.add_parser("doctor", help="probe every capability the suite depends on")
    doc.add_argument("--json", action="store_true", help="print JSON instead of a table")
    run = sub.add_parser("run", help="run the conformance cases against the local kernel and write the report")
    run.add_argument("--report", metavar="DIR", help="report folder (default reports/<UTC timestamp>)")
    run.add_argument("--family", action="append", choices=("ipv4", "ipv6", "dual"))
    run.add_argument("-k", metavar="EXPR", help="only cases matching this pytest -k expression")
    run.add_argument("-j", "--jobs", type=int, default=1, help="parallel workers (pytest-xdist)")
    run.add_argument("--strict", action="store_true", help="a failed SHOULD-class requirement exits 1 too")
    mat = sub.add_parser("matrix", help="run the interop matrix (ci/matrix.yaml): client x server x scenario")
    mat.add_argument("--file", metavar="YAML", help="matrix declaration (default ci/matrix.yaml)")
    mat.add_argument("--client", metavar="A,B", help="implementations in the client role (default: all)")
    mat.add_argument("--server", metavar="C,D", help="implementations in the server role (default: all)")
    mat.add_argument("--cases", metavar="PATTERN", help="comma-separated globs over scenario names (default: all)")
    mat.add_argument("--family", action="append", choices=("ipv4", "ipv6", "dual"),
                     help="address families (default: the matrix file's)")
    mat.add_argument("--out", metavar="DIR", default="reports/matrix",
                     help="one folder per pair, matrix.json and matrix.html (default reports/matrix)")
    mat.add_argument("--list-pairs", action="store_true", help="print the selected pairs as JSON and exit (CI)")
    mat.add_argument("--merge", nargs="+", metavar="PAIR_DIR",
                     help="run nothing: build the matrix from these pair folders (one per CI job)")
    mat.add_argument("--strict", action="store_true", help="a failed SHOULD-class requirement exits 1 too")
    chk = sub.add_parser("check-pcap",
                         help="rebuild the MPTCP connections of captures and judge the passive rules")
    chk.add_argument("pcap", nargs="+", help="pcap or pcapng files of one network (several links are merged)")
    chk.add_argument("--json", action="store_true", help="machine-readable output")
    chk.add_argument("--only", metavar="IDS", help="comma-separated requirement IDs to report")
    chk.add_argument("--strict", action="store_true", help="a failed SHOULD fails the exit code too")
    chk.add_argument("--tshark", action="store_true",
                     help="also compare the verdicts with tshark's MPTCP analysis; a disagreement exits 1")
    chk.add_argument("--complete", action="store_true",
                     help="the captures show every subflow (all paths): judge Data ACKs against all data seen")
    gst = sub.add_parser("guest", help="fetch a Debian kernel, boot it as a guest endpoint, report how it booted")
    gst.add_argument("version", help="Debian kernel version (6.1, 6.12, 6.1.0-52): linux-<version>-kvm")
    gst.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto",
                     help="accelerator (default: KVM where it boots the kernel, else TCG; detected once)")
    gst.add_argument("--json", action="store_true", help="machine-readable output")
    from conformance.packetdrill.engines import ENGINES, MODES
    from conformance.packetdrill.variants import NAMES

    pkt = sub.add_parser("pkt", help="run packetdrill scripts (the MPTCP fork's dialect) against the local kernel")
    pkt.add_argument("script", nargs="+", help=".pkt files, or folders searched for them")
    pkt.add_argument("--engine", default="auto", choices=ENGINES,
                     help="the real packetdrill (PATH or $PACKETDRILL) or our interpreter (default: auto)")
    pkt.add_argument("--mode", default="strict", choices=MODES,
                     help="strict: every byte and time like packetdrill; rfc: only what RFC 8684 requires")
    pkt.add_argument("--variant", default="all", choices=(*NAMES, "all"),
                     help="address family (default: all the script's name allows)")
    pkt.add_argument("--json", action="store_true", help="machine-readable output")
    rep = sub.add_parser("report", help="render report.md, report.html and junit.xml again from a results.json")
    rep.add_argument("results", help="path of results.json")
    rep.add_argument("--out", metavar="DIR", help="output folder (default: beside results.json)")
    rep.add_argument("--strict", action="store_true", help="a failed SHOULD-class requirement exits 1 too")
    args, extra = ap.parse_known_args(argv)
    if args.command == "matrix":
        args.pytest_args, extra = extra, []  # like run: the rest goes to each pair's pytest
    if extra and args.command != "run":
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "doctor":
            from conformance import doctor

            return doctor.main(["--json"] if args.json else [])
        if args.command == "run":
            return _run(args, extra)
        if args.command == "matrix":
            return _matrix(args)
        if args.command == "check-pcap":
            return _check_pcap(args)
        if args.command == "guest":
            return _guest(args)
        if args.command == "pkt":
            return _pkt(args)
        return _report(args)
    finally:
        from conformance.net.names import release_run

        release_run()


if __name__ == "__main__":
    sys.exit(main())
