"""The run's progress bar and summary table, fed the reports pytest (or xdist's controller) sees."""

from __future__ import annotations

import io
from types import SimpleNamespace

from rich.console import Console

from conformance.progress import RunProgress


def _report(nodeid: str, when: str, outcome: str, duration: float = 0.5) -> SimpleNamespace:
    crash = SimpleNamespace(message="conformance.verdict.OracleDisagreement: 1 of 9 checks failed")
    props = [("unsupported", "linux-userspace-pm on c1: fullmesh")] if outcome == "unsupported" else []
    skipped = outcome in ("skipped", "unsupported")
    return SimpleNamespace(nodeid=nodeid, when=when, duration=duration, skipped=skipped,
                           failed=outcome in ("failed", "oracle"), passed=outcome == "passed",
                           longrepr=SimpleNamespace(reprcrash=crash) if outcome == "oracle" else None,
                           user_properties=props)


def _case(p: RunProgress, nodeid: str, setup: str = "passed", call: str | None = "passed",
          teardown: str = "passed") -> None:
    p.pytest_runtest_logstart(nodeid, ("", 0, ""))
    p.pytest_runtest_logreport(_report(nodeid, "setup", setup))
    if call is not None:
        p.pytest_runtest_logreport(_report(nodeid, "call", call))
    p.pytest_runtest_logreport(_report(nodeid, "teardown", teardown))


def test_outcomes_are_counted_per_case_and_summed_per_file() -> None:
    out = io.StringIO()
    # 80 columns: what a console that is not a terminal gets (CI logs, the matrix's pair runs).
    p = RunProgress(Console(file=out, width=80, force_terminal=False))
    p.pytest_xdist_node_collection_finished(None, ["a"] * 7)
    _case(p, "cases/test_a.py::test_ok")
    _case(p, "cases/test_a.py::test_bad", call="failed")
    _case(p, "cases/test_s3_2_to_3_5_active.py::test_skipped", setup="skipped", call=None)
    _case(p, "cases/test_s3_2_to_3_5_active.py::test_setup_broke", setup="failed", call=None)
    _case(p, "cases/test_s3_2_to_3_5_active.py::test_teardown_broke", teardown="failed")
    _case(p, "cases/test_s3_2_to_3_5_active.py::test_judges_disagree", call="oracle")
    _case(p, "cases/test_s3_2_to_3_5_active.py::test_fullmesh", call="unsupported")
    assert dict(p.counts) == {"pass": 1, "fail": 1, "skip": 1, "error": 2, "oracle-disagreement": 1,
                              "unsupported": 1}
    assert p.bar.tasks[0].completed == 7 and p.bar.tasks[0].total == 7
    p.pytest_sessionfinish(None)
    text = out.getvalue()
    text = text[text.index("cases by file"):]
    assert "…" not in text  # nothing of the table cut to fit
    header = next(line.split() for line in text.splitlines() if line.split()[:1] == ["file"])
    assert header == ["file", "pass", "fail", "oracle", "unsup", "skip", "error", "time"]
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()
            if line.split()[:1] and line.split()[0] in ("a", "s3_2_to_3_5_active", "total")}
    assert rows["a"] == ["1", "1", "0", "0", "0", "0", "3.0", "s"]
    assert rows["s3_2_to_3_5_active"][:6] == ["0", "0", "1", "1", "1", "2"]
    assert rows["total"][:6] == ["1", "1", "1", "1", "1", "2"]
