"""The `mptcp-conformance` command: doctor, run, report."""

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
    argv = [str(CASES_DIR), "-p", "no:cacheprovider", "--mptcp-report", str(folder), "-q"]
    if args.jobs and args.jobs > 1:
        argv += ["-n", str(args.jobs)]
    for fam in args.family or []:
        argv += ["--mptcp-family", fam]
    if args.k:
        argv += ["-k", args.k]
    rc = pytest.main(argv + extra)
    # pytest: 0 all passed, 1 some failed, 5 none collected, 2-4 usage/internal errors.
    return {0: EXIT_OK, 1: EXIT_FAIL}.get(int(rc), EXIT_ENV)


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
    return EXIT_FAIL if results.counts()["fail"] or results.counts()["error"] else EXIT_OK


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
    rep = sub.add_parser("report", help="render report.md and junit.xml again from a results.json")
    rep.add_argument("results", help="path of results.json")
    rep.add_argument("--out", metavar="DIR", help="output folder (default: beside results.json)")
    args, extra = ap.parse_known_args(argv)
    if extra and args.command != "run":
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "doctor":
            from conformance import doctor

            return doctor.main(["--json"] if args.json else [])
        if args.command == "run":
            return _run(args, extra)
        return _report(args)
    finally:
        from conformance.net.names import release_run

        release_run()


if __name__ == "__main__":
    sys.exit(main())
