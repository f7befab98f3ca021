"""The pytest plugin (entry point `pytest11`): markers, the `lab` fixture, results and reports.

Markers:
  @pytest.mark.rfc8684("R3.1-11", ...)   requirement IDs a case proves (unknown ID: usage error)
  @pytest.mark.topology("two_path", **params)   the topology the `lab` fixture builds
  @pytest.mark.families("ipv4", "ipv6")  restrict the address families (default: all three)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import signal
import time
from pathlib import Path

import pytest

from conformance import __version__
from conformance.errors import CapabilityMissing, HarnessError
from conformance.net.cleanup import Cleanup
from conformance.net.names import release_run, sweep_stale
from conformance.net.topo import FAMILIES
from conformance.report.model import CaseResult, RunResults
from conformance.verdict import OracleDisagreement

REPORT_ENV = "MPTCP_CONFORMANCE_REPORT"
ESSENTIAL = ("root", "socket:mptcp", "sockopt:mptcp_info", "tcpdump", "tshark", "mnexec", "ethtool")
_results_key = pytest.StashKey[RunResults]()
_partial_key = pytest.StashKey[dict]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mptcp", "MPTCP conformance")
    group.addoption("--mptcp-report", metavar="DIR", default=None,
                    help="write results.json, report.md, junit.xml and artefacts here "
                         "(default: reports/<UTC timestamp>)")
    group.addoption("--mptcp-family", action="append", choices=FAMILIES, default=None,
                    help="run cases only in these address families (repeatable)")
    group.addoption("--mptcp-client", metavar="IMPL", default="linux",
                    help="implementation in the client role (conformance.implementations; default linux)")
    group.addoption("--mptcp-server", metavar="IMPL", default="linux",
                    help="implementation in the server role (default linux)")
    group.addoption("--mptcp-progress", action="store_true", default=False,
                    help="show a progress bar over the cases and a summary table at the end (rich)")
    from conformance.packetdrill.collect import add_options

    add_options(group)


def pytest_collect_file(parent: pytest.Collector, file_path: Path):
    from conformance.packetdrill.collect import collect_file

    return collect_file(parent, file_path)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "rfc8684(*ids): RFC 8684 requirement IDs this case proves")
    config.addinivalue_line("markers", "topology(name, **params): topology the lab fixture builds")
    config.addinivalue_line("markers", "families(*names): address families the case runs in")
    if not hasattr(config, "workerinput"):  # the controller (or a run without xdist)
        folder = config.getoption("mptcp_report") or os.environ.get(REPORT_ENV)
        if not folder:
            folder = str(Path("reports") / dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ"))
        os.environ[REPORT_ENV] = str(Path(folder).resolve())
        config.stash[_results_key] = RunResults(suite_version=__version__,
                                                started=dt.datetime.now(dt.UTC).isoformat())
        config.stash[_partial_key] = {}
        if config.getoption("mptcp_progress"):
            from conformance.progress import RunProgress

            config.pluginmanager.register(RunProgress(), "mptcp-progress")
    if os.geteuid() == 0:
        report = sweep_stale()
        if report.removed_netns:
            print(f"mptcp-conformance: {report}")
    # SIGTERM (CI timeouts, `kill`) takes the same cleanup path as Ctrl-C.
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        global _main_pid
        _main_pid = os.getpid()
        signal.signal(signal.SIGTERM, _terminate)


_main_pid = 0


def _terminate(signum, frame):
    if os.getpid() != _main_pid:
        # A forked helper (pyroute2 forks to open sockets in a namespace) inherits this handler;
        # it must die quietly, not unwind a copy of the test session and its cleanups.
        os._exit(128 + signum)
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_unconfigure(config: pytest.Config) -> None:
    from conformance.endpoints.guest.endpoint import shutdown

    shutdown()  # the session's guests, before their namespaces' owner record goes
    release_run()


def report_dir() -> Path:
    return Path(os.environ[REPORT_ENV])


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    from conformance.requirements import load_catalogue

    catalogue = load_catalogue()
    unknown = []
    for item in items:
        for mark in item.iter_markers("rfc8684"):
            if not mark.args:
                unknown.append(f"{item.nodeid}: @rfc8684 names no requirement")
            unknown += [f"{item.nodeid}: unknown requirement ID {rid!r}" for rid in mark.args
                        if rid not in catalogue]
    if unknown:
        raise pytest.UsageError("requirement IDs not in the catalogue "
                                f"({catalogue.source}):\n  " + "\n  ".join(unknown))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "family" in metafunc.fixturenames:
        mark = metafunc.definition.get_closest_marker("families")
        fams = list(mark.args) if mark else list(FAMILIES)
        chosen = metafunc.config.getoption("mptcp_family")
        if chosen:
            fams = [f for f in fams if f in chosen]
        metafunc.parametrize("family", fams, indirect=True)


@pytest.fixture
def family(request: pytest.FixtureRequest) -> str:
    return request.param


def _require(*names: str) -> None:
    from conformance import doctor

    try:
        doctor.require(*names)
    except CapabilityMissing as exc:
        pytest.skip(f"this machine cannot run the case: {exc}")


def _artefact_dir(nodeid: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid.replace("::", "__")).strip("_")
    return report_dir() / "artefacts" / safe


@pytest.fixture
def lab(request: pytest.FixtureRequest, family: str):
    """A running topology for one case (see conformance.lab.Lab); always torn down."""
    _require(*ESSENTIAL)
    from conformance.lab import Lab
    from conformance.net.registry import make_topology

    mark = request.node.get_closest_marker("topology")
    name, params = (mark.args[0], dict(mark.kwargs)) if mark else ("two_path", {})
    folder = _artefact_dir(request.node.nodeid)
    # Relative to the report folder, so a moved report keeps working links.
    request.node.user_properties += [("artefacts", str(folder.relative_to(report_dir()))),
                                     ("topology", name), ("family", family)]
    cleanup = Cleanup()
    try:
        roles = {"client": request.config.getoption("mptcp_client"),
                 "server": request.config.getoption("mptcp_server")}
        from conformance.implementations import get as implementation

        if any(implementation(n).guest for n in roles.values()) or "guest_router" in params:
            _require("guest:accelerator")  # qemu, busybox, gcc: or the doctor's reason to skip
        the_lab = Lab(make_topology(name, family=family, **params), folder, cleanup, family=family,
                      implementations=roles)
        yield the_lab
    finally:
        cleanup.run()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    from conformance.implementations import ImplementationUnsupported

    try:
        result = yield
    except ImplementationUnsupported as exc:
        # Not a failure of the implementation and not a gap of this machine: its own outcome.
        item.user_properties.append(("unsupported", str(exc)))
        pytest.skip(f"unsupported: {exc}")
    the_lab = getattr(item, "funcargs", {}).get("lab")
    if the_lab is not None:
        the_lab.finish()
        the_lab.expect.verdict(tuple(rid for m in item.iter_markers("rfc8684") for rid in m.args))
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    ids = [rid for m in item.iter_markers("rfc8684") for rid in m.args]
    if ids:  # a conformance case: carry what the report needs (xdist ships these to the controller)
        the_lab = getattr(item, "funcargs", {}).get("lab")
        # The case's own requirements, then those the passive rules judged on its captures.
        passive = sorted(the_lab.passive_ids - set(ids)) if the_lab is not None else []
        report.user_properties.append(("requirements", ids + passive))
        doc = (getattr(getattr(item, "obj", None), "__doc__", None) or "").strip().splitlines()
        report.user_properties.append(("description", doc[0] if doc else ""))
        if call.when == "call" and the_lab is not None:
            report.user_properties.append(("evidence", the_lab.expect.evidence()))
            report.user_properties.append(("checks", [
                {"requirement": c.requirement, "ok": c.ok, "text": str(c),
                 **({"deviation": c.deviation} if c.deviation else {}), **({"oracle": True} if c.oracle else {})}
                for c in the_lab.expect.checks]))
            report.user_properties.append(("implementations", dict(the_lab.implementations)))
            report.user_properties.append(("middleboxes", list(the_lab.attached)))
    return report


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    config = _controller_config
    if config is None or _partial_key not in config.stash:
        return
    partial = config.stash[_partial_key]
    if report.outcome == "rerun":
        # pytest-rerunfailures runs it again (the case's condition did not arise: NotExercised):
        # this attempt is no verdict; its teardown report is dropped with it.
        partial[report.nodeid] = {"rerun": True}
        return
    if partial.get(report.nodeid, {}).get("rerun"):
        if report.when == "teardown":
            partial.pop(report.nodeid)
        return
    entry = partial.setdefault(report.nodeid, {"outcome": "pass", "reason": None, "duration": 0.0,
                                               "props": {}})
    entry["duration"] += report.duration
    for key, value in report.user_properties:
        entry["props"][key] = value
    entry["outcome"] = case_outcome(entry["outcome"], report)
    if report.skipped and report.when in ("setup", "call"):
        entry["reason"] = _skip_reason(report)
    elif report.failed:
        entry["reason"] = (entry["reason"] + "\n" if entry["reason"] else "") + _failure_text(report)
    if report.when == "teardown":
        _finish_case(config, report.nodeid, partial.pop(report.nodeid))


def case_outcome(now: str, report: pytest.TestReport) -> str:
    """A case's outcome so far (`now`, "pass" before its setup) after one phase's report: a skip in
    setup or call skips it, a failed call fails it (or is an oracle disagreement), a failure in
    setup or teardown is an error."""
    if report.skipped and report.when in ("setup", "call"):
        return "unsupported" if any(k == "unsupported" for k, _ in report.user_properties) else "skip"
    if not report.failed:
        return now
    if report.when == "call" and now != "error" and not _harness_broke(report):
        return "oracle-disagreement" if _only_oracles(report) else "fail"
    return "error"


_ORACLE_FAILURE = f"{OracleDisagreement.__module__}.{OracleDisagreement.__qualname__}"
def _harness_broke(report: pytest.TestReport) -> bool:
    """The call ended on a HarnessError (the harness broke, or could not create the condition the
    case is about): an error, not a verdict on the implementation."""
    crash = getattr(report.longrepr, "reprcrash", None)
    kinds, todo = [], [HarnessError]
    while todo:  # subclasses live in modules imported later (the guest's GuestError)
        kind = todo.pop()
        kinds.append(f"{kind.__module__}.{kind.__qualname__}:")
        todo += kind.__subclasses__()
    return crash is not None and crash.message.startswith(tuple(kinds))


def _only_oracles(report: pytest.TestReport) -> bool:
    """The case failed on oracle checks alone (verdict.OracleDisagreement, as pytest names it)."""
    crash = getattr(report.longrepr, "reprcrash", None)
    return crash is not None and crash.message.startswith(_ORACLE_FAILURE)


def _skip_reason(report: pytest.TestReport) -> str:
    if isinstance(report.longrepr, tuple):
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    return str(report.longrepr)


def _failure_text(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return crash.message
    return str(report.longrepr).strip().splitlines()[-1] if report.longrepr else "failed"


def _finish_case(config: pytest.Config, nodeid: str, entry: dict) -> None:
    props = entry["props"]
    ids = props.get("requirements")
    if not ids:  # not a conformance case (a unit test of our own code)
        return
    config.stash[_results_key].cases.append(CaseResult(
        id=nodeid, name=nodeid.split("::")[-1], description=props.get("description", ""),
        requirements=list(ids), outcome=entry["outcome"], reason=entry["reason"],
        duration_s=round(entry["duration"], 3), artefacts=props.get("artefacts"),
        topology=props.get("topology"), family=props.get("family"),
        implementations=props.get("implementations", {}), evidence=props.get("evidence", []),
        checks=props.get("checks", []), middleboxes=props.get("middleboxes", [])))


_controller_config: pytest.Config | None = None


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    global _controller_config
    if _partial_key in session.config.stash:
        _controller_config = session.config


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    if _results_key not in config.stash:
        return
    results = config.stash[_results_key]
    if not results.cases:
        return
    results.finished = dt.datetime.now(dt.UTC).isoformat()
    results.environment = _environment()
    from conformance.implementations import describe

    used = sorted({name for case in results.cases for name in case.implementations.values()})
    results.implementations = {name: describe(name) for name in used}
    from conformance.report.writers import write_all
    from conformance.requirements import load_catalogue

    folder = report_dir()
    folder.mkdir(parents=True, exist_ok=True)
    write_all(results, load_catalogue(), folder)
    tr = config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        counts = results.counts()
        tr.write_line(f"mptcp-conformance report: {folder} ({', '.join(f'{v} {k}' for k, v in counts.items())})")


def _environment() -> dict:
    import platform

    from conformance.proc import run

    def version(argv: list[str]) -> str:
        with contextlib.suppress(Exception):
            out = run(argv, check=False)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        return "unavailable"

    env = {"kernel": platform.release(), "python": platform.python_version(), "time": time.time()}
    env["iproute2"] = version(["ip", "-V"])
    env["tshark"] = version(["tshark", "--version"])
    env["tcpdump"] = version(["tcpdump", "--version"])
    for mod in ("scapy", "pyroute2", "mininet"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version as dist_version
            env[mod] = dist_version(mod)
    return env
