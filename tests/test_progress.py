"""The run's progress bar and summary table, fed the reports pytest (or xdist's controller) sees."""

from __future__ import annotations

import io
from types import SimpleNamespace

from rich.console import Console

from conformance.progress import RunProgress


def _report(nodeid: str, when: str, outcome: str, duration: float = 0.5) -> SimpleNamespace:
    crash = SimpleNamespace(message="conformance.verdict.OracleDisagreement: 1 of 9 checks failed")
    return SimpleNamespace(nodeid=nodeid, when=when, duration=duration, skipped=outcome == "skipped",
                           failed=outcome in ("failed", "oracle"), passed=outcome == "passed",
                           longrepr=SimpleNamespace(reprcrash=crash) if outcome == "oracle" else None)


def _case(p: RunProgress, nodeid: str, setup: str = "passed", call: str | None = "passed",
          teardown: str = "passed") -> None:
    p.pytest_runtest_logstart(nodeid, ("", 0, ""))
    p.pytest_runtest_logreport(_report(nodeid, "setup", setup))
    if call is not None:
        p.pytest_runtest_logreport(_report(nodeid, "call", call))
    p.pytest_runtest_logreport(_report(nodeid, "teardown", teardown))


def test_outcomes_are_counted_per_case_and_summed_per_file() -> None:
    out = io.StringIO()
    p = RunProgress(Console(file=out, width=120, force_terminal=False))
    p.pytest_xdist_node_collection_finished(None, ["a"] * 6)
    _case(p, "cases/test_a.py::test_ok")
    _case(p, "cases/test_a.py::test_bad", call="failed")
    _case(p, "cases/test_b.py::test_skipped", setup="skipped", call=None)
    _case(p, "cases/test_b.py::test_setup_broke", setup="failed", call=None)
    _case(p, "cases/test_b.py::test_teardown_broke", teardown="failed")
    _case(p, "cases/test_b.py::test_judges_disagree", call="oracle")
    assert dict(p.counts) == {"pass": 1, "fail": 1, "skip": 1, "error": 2, "oracle-disagreement": 1}
    assert p.bar.tasks[0].completed == 6 and p.bar.tasks[0].total == 6
    p.pytest_sessionfinish(None)
    text = out.getvalue()
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in text.splitlines() if line.count("│") == 8}
    assert rows["cases/test_a.py"] == ["1", "1", "0", "0", "0", "3.0 s"]
    assert rows["cases/test_b.py"][:5] == ["0", "0", "1", "1", "2"]
    assert rows["total"][:5] == ["1", "1", "1", "1", "2"]
