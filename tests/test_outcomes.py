"""A case's outcome from pytest's phase reports: a failed check is a fail, a broken harness (or a
condition it could not create) an error, oracle disagreements their own outcome."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from conformance.pytest_plugin import case_outcome


def _report(when: str, message: str | None) -> SimpleNamespace:
    crash = SimpleNamespace(message=message) if message is not None else None
    return SimpleNamespace(when=when, skipped=False, failed=message is not None, user_properties=[],
                           longrepr=SimpleNamespace(reprcrash=crash))


def test_a_call_failing_on_a_harness_error_is_an_error_not_a_fail() -> None:
    assert case_outcome("pass", _report("call", "conformance.verdict.CaseFailed: 1 of 5 checks failed")) == "fail"
    assert case_outcome("pass", _report("call", "conformance.verdict.OracleDisagreement: 1 of 5")) == \
        "oracle-disagreement"
    assert case_outcome("pass", _report("call", "conformance.errors.HarnessError: no merge lost the start of "
                                                "a mapping this time")) == "error"
    # Subclasses count, wherever they are defined (the guest's errors are imported late).
    from conformance.endpoints.guest.vm import GuestError

    assert case_outcome("pass", _report("call", f"{GuestError.__module__}.GuestError: no answer")) == "error"
    assert case_outcome("pass", _report("call", "conformance.errors.CommandError: command failed")) == "error"
    assert case_outcome("pass", _report("call", None)) == "pass"


def test_a_case_whose_condition_did_not_arise_runs_again_and_counts_once(tmp_path: Path) -> None:
    """NotExercised is no verdict: pytest-rerunfailures runs the case again and the report holds
    the last attempt alone."""
    (tmp_path / "test_once.py").write_text(
        "import pytest\n"
        "from conformance.errors import NotExercised\n"
        "ATTEMPTS = []\n"
        "@pytest.mark.flaky(reruns=2, only_rerun=['NotExercised'])\n"
        "@pytest.mark.rfc8684('R3.1-01')\n"
        "def test_case():\n"
        "    ATTEMPTS.append(1)\n"
        "    if len(ATTEMPTS) == 1:\n"
        "        raise NotExercised('the race went the other way')\n")
    cp = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "test_once.py",
                         "--mptcp-report", str(tmp_path / "report")], cwd=tmp_path, capture_output=True,
                        text=True, timeout=120)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "1 passed, 1 rerun" in cp.stdout
    cases = json.loads((tmp_path / "report" / "results.json").read_text())["cases"]
    assert [(c["id"], c["outcome"]) for c in cases] == [("test_once.py::test_case", "pass")]
