"""A case's outcome from pytest's phase reports: a failed check is a fail, a broken harness (or a
condition it could not create) an error, oracle disagreements their own outcome."""

from __future__ import annotations

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
