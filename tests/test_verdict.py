"""Non-fatal checks and the case verdict."""

from types import SimpleNamespace

import pytest

from conformance.pytest_plugin import _only_oracles
from conformance.verdict import CaseFailed, Expect, OracleDisagreement


def test_every_failure_is_listed_with_what_was_seen():
    e = Expect()
    e.equal(1, 2, "flags", seen="frame 3", rid="R3.1-18")
    e.that(False, "length", expected="12", seen="16")
    e.that(True, "token", expected="x", seen="x", rid="R3.1-21")
    with pytest.raises(CaseFailed) as exc:
        e.verdict()
    text = str(exc.value)
    assert "2 of 3 checks failed" in text
    assert "[R3.1-18] flags: expected 2; seen 1 (frame 3)" in text
    assert "length: expected 12; seen 16" in text


def test_a_case_that_checks_nothing_fails():
    with pytest.raises(CaseFailed, match="no check"):
        Expect().verdict()


def test_a_named_requirement_without_a_check_fails():
    e = Expect()
    e.that(True, "token", expected="x", seen="x", rid="R3.1-21")
    e.verdict(("R3.1-21",))
    with pytest.raises(CaseFailed, match=r"names R3\.2-03 but made no check"):
        e.verdict(("R3.1-21", "R3.2-03"))


def test_counter_check_accepts_ranges():
    e = Expect()
    counters = {"s1": {"MPTcpExtMPJoinSynRx": 2}}
    assert e.counter(counters, "s1", "MPJoinSynRx", range(1, 3))
    assert not e.counter(counters, "s1", "MPJoinAckRx", 1)
    assert "s1 counter MPTcpExtMPJoinAckRx: expected 1; seen 0" in str(e.failures[0])


def test_failures_of_oracle_checks_alone_are_an_oracle_disagreement():
    e = Expect()
    e.that(True, "token", expected="x", seen="x", rid="R3.1-21")
    e.that(False, "oracle: tshark agrees", expected="no disagreement", seen="R3.1-21 differs", oracle=True)
    with pytest.raises(OracleDisagreement) as exc:
        e.verdict()
    report = SimpleNamespace(longrepr=SimpleNamespace(reprcrash=SimpleNamespace(
        message=f"conformance.verdict.OracleDisagreement: {exc.value}")))
    assert _only_oracles(report)
    e.that(False, "flags", expected="1", seen="0", rid="R3.1-18")  # and the implementation fails too
    with pytest.raises(CaseFailed) as exc:
        e.verdict()
    assert type(exc.value) is CaseFailed
    assert not _only_oracles(SimpleNamespace(longrepr=SimpleNamespace(reprcrash=SimpleNamespace(
        message=f"conformance.verdict.CaseFailed: {exc.value}"))))
