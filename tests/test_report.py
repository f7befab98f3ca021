"""Report writers: verdict aggregation, report.md, junit.xml, results.json and the folder's atomicity."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conformance.report import writers
from conformance.report.model import CaseResult, RunResults
from conformance.requirements import load_catalogue

CAT = load_catalogue()

# Real catalogue IDs, one per level group, plus a not-testable one and an ID the catalogue lacks.
MUST_A = "R3.1-06"  # MUST, wire-passive
MUST_C = "R3-03"  # MUST, wire-active
SHOULD_B = "R3.1-01"  # SHOULD, wire-passive
MAY_D = "R3.1-03"  # MAY, wire-active
IMPLICIT_E = "R3.1-L01"  # implicit, wire-passive
UNTESTABLE_F = "R3.1-10"  # MUST, not-testable
UNKNOWN = "R99-01"

FAIL_REASON = "expected version 1 | got 0\nsecond line \x1b[31mred\x1b[0m \x00nul"


def _check(rid: str | None, text: str, ok: bool = True) -> dict:
    return {"requirement": rid, "ok": ok, "text": text}


def make_results() -> RunResults:
    return RunResults(
        suite_version="0.1.0",
        started="2025-01-02T03:04:05+00:00",
        finished="2025-01-02T03:05:05+00:00",
        environment={"kernel": "6.12.0", "tools": {"tcpdump": "4.99.4", "ip": "iproute2-6.1"}},
        cases=[
            CaseResult(id="cases/test_handshake.py::test_mp_capable[v4]", name="test_mp_capable",
                       description="MP_CAPABLE handshake", requirements=[MUST_A, SHOULD_B],
                       outcome="pass", duration_s=1.5, artefacts="artefacts/test_mp_capable-v4",
                       checks=[_check(None, "SYN carried MP_CAPABLE version 1"),
                               _check(SHOULD_B, f"[{SHOULD_B}] MP_CAPABLE version: 1"),
                               _check(MUST_A, f"[{MUST_A}] keys differ: yes")]),
            CaseResult(id="cases/test_handshake.py::test_mp_capable[v6]", name="test_mp_capable",
                       description="MP_CAPABLE handshake", requirements=[MUST_A, MUST_C],
                       outcome="fail", reason=FAIL_REASON, duration_s=2.25,
                       artefacts="artefacts/test_mp_capable-v6"),
            CaseResult(id="cases/test_join.py::test_join", name="test_join", description="MP_JOIN",
                       requirements=[MAY_D], outcome="skip", reason="kernel lacks MP_JOIN knob"),
            CaseResult(id="cases/test_join.py::TestRemove::test_remove", name="test_remove",
                       description="REMOVE_ADDR", requirements=[IMPLICIT_E, UNKNOWN], outcome="error",
                       reason="harness broke: <tcpdump> did not start", duration_s=0.5),
            CaseResult(id="cases/test_dss.py::test_dss", name="test_dss", description="DSS",
                       requirements=[SHOULD_B, UNTESTABLE_F, SHOULD_B], outcome="pass", duration_s=3.0,
                       evidence=["DSS mapping covered every byte"]),
            CaseResult(id="cases/test_dss.py::test_dss_skip", name="test_dss_skip", description="DSS 2",
                       requirements=[SHOULD_B, MAY_D], outcome="skip", reason="no second path"),
        ],
    )


EXPECTED = {MUST_A: "fail", MUST_C: "fail", SHOULD_B: "pass", MAY_D: "skip", IMPLICIT_E: "fail",
            UNTESTABLE_F: "pass", UNKNOWN: "fail"}


def test_catalogue_ids_are_what_the_test_assumes() -> None:
    assert CAT[MUST_A].level == "MUST" and CAT[MUST_A].testability != "not-testable"
    assert CAT[MUST_C].level == "MUST" and CAT[MUST_C].testability != "not-testable"
    assert CAT[SHOULD_B].level == "SHOULD" and CAT[SHOULD_B].testability != "not-testable"
    assert CAT[MAY_D].level == "MAY" and CAT[MAY_D].testability != "not-testable"
    assert CAT[IMPLICIT_E].level == "implicit" and CAT[IMPLICIT_E].testability != "not-testable"
    assert CAT[UNTESTABLE_F].testability == "not-testable"
    assert UNKNOWN not in CAT


def test_verdict_aggregation() -> None:
    verdicts = writers.requirement_verdicts(make_results(), CAT)
    assert {rid: v.verdict for rid, v in verdicts.items() if v.verdict != "not-covered"} == EXPECTED
    assert set(verdicts) == set(CAT.by_id) | {UNKNOWN}
    assert list(verdicts)[-1] == UNKNOWN  # unknown IDs come after the catalogue ones

    a = verdicts[MUST_A]  # pass + fail -> fail, with the failure reason and the passing case's evidence
    assert a.cases == ["cases/test_handshake.py::test_mp_capable[v4]",
                       "cases/test_handshake.py::test_mp_capable[v6]"]
    assert any("expected version 1" in e for e in a.evidence)
    assert "SYN carried MP_CAPABLE version 1" in a.evidence
    # A check about another requirement stays with that requirement.
    assert f"[{MUST_A}] keys differ: yes" in a.evidence
    assert f"[{SHOULD_B}] MP_CAPABLE version: 1" not in a.evidence
    assert a.artefacts == ["artefacts/test_mp_capable-v4", "artefacts/test_mp_capable-v6"]

    b = verdicts[SHOULD_B]  # pass + pass + skip -> pass; skip reasons do not clutter a pass
    assert b.cases == ["cases/test_handshake.py::test_mp_capable[v4]", "cases/test_dss.py::test_dss",
                       "cases/test_dss.py::test_dss_skip"]  # the duplicate naming counts once
    assert not any("no second path" in e for e in b.evidence)
    assert f"[{SHOULD_B}] MP_CAPABLE version: 1" in b.evidence
    assert f"[{MUST_A}] keys differ: yes" not in b.evidence

    d = verdicts[MAY_D]  # all skipped -> skip, carrying every skip reason
    assert any("kernel lacks MP_JOIN knob" in e for e in d.evidence)
    assert any("no second path" in e for e in d.evidence)

    e = verdicts[IMPLICIT_E]  # error -> fail
    assert any("did not start" in x for x in e.evidence)

    nc = verdicts["R3-01"]
    assert (nc.verdict, nc.cases, nc.evidence, nc.artefacts) == ("not-covered", [], [], [])

    with pytest.raises(AttributeError):  # frozen
        a.verdict = "pass"  # type: ignore[misc]


def test_empty_run() -> None:
    results = RunResults(suite_version="0", started="2025-01-01T00:00:00+00:00")
    verdicts = writers.requirement_verdicts(results, CAT)
    assert {v.verdict for v in verdicts.values()} == {"not-covered"}
    md = writers.render_markdown(results, CAT)
    assert "No cases ran." in md


def _expected_coverage_rows() -> dict[str, str]:
    # Independent of writers: own level grouping, own counting from EXPECTED.
    groups = {"MUST": {"MUST", "MUST NOT", "REQUIRED", "SHALL", "SHALL NOT"},
              "SHOULD": {"SHOULD", "SHOULD NOT", "RECOMMENDED", "NOT RECOMMENDED"},
              "MAY": {"MAY", "OPTIONAL"}, "implicit": {"implicit"}}
    rows = {}
    totals = [0] * 8
    for name, levels in groups.items():
        testable = [r for r in CAT if r.level in levels and r.testability != "not-testable"]
        got = [EXPECTED.get(r.id, "not-covered") for r in testable]
        nums = [len(testable), sum(v != "not-covered" for v in got), got.count("pass"), got.count("deviation"),
                got.count("fail"), got.count("oracle-disagreement"), got.count("skip"), got.count("not-covered")]
        totals = [t + n for t, n in zip(totals, nums, strict=True)]
        rows[name] = f"| {name} | " + " | ".join(map(str, nums)) + " |"
    rows["total"] = "| total | " + " | ".join(map(str, totals)) + " |"
    return rows


def test_markdown(tmp_path: Path) -> None:
    path = tmp_path / "report.md"
    writers.write_markdown(make_results(), CAT, path)
    md = path.read_text()
    lines = md.splitlines()

    assert lines[0].startswith("# ")
    assert "\x1b" not in md and "\x00" not in md and "[31m" not in md  # terminal escapes stripped
    assert "0.1.0" in md and "2025-01-02T03:04:05+00:00" in md
    assert "| kernel | 6.12.0 |" in lines and "| tools.tcpdump | 4.99.4 |" in lines
    for outcome, n in (("pass", 2), ("fail", 1), ("skip", 2), ("error", 1), ("total", 6)):
        assert f"| {outcome} | {n} |" in lines

    rows = _expected_coverage_rows()
    for row in rows.values():
        assert row in lines, row

    # One verdict row per covered requirement, linked to its section, inside the right section.
    for rid, verdict in EXPECTED.items():
        if rid == UNKNOWN:
            continue
        req = CAT[rid]
        row = [ln for ln in lines if ln.startswith(f"| [{rid}]({req.url}) |")]
        assert len(row) == 1, rid
        cells = [c.strip() for c in row[0].split(" | ")]
        assert cells[1] == req.level and cells[3] == verdict, row[0]
        heading = max(i for i, ln in enumerate(lines[: lines.index(row[0])]) if ln.startswith("### "))
        assert lines[heading].startswith(f"### {req.section} ")
    assert not any(ln.startswith("| [R3-01](") for ln in lines)  # not covered: no table row

    # Sections appear in document order.
    sections = set(CAT.sections())
    headings = [ln.split()[1] for ln in lines if ln.startswith("### ") and ln.split()[1] in sections]
    assert headings == ["3", "3.1"]

    # '|' and newlines from a reason must not break the table row.
    a_row = next(ln for ln in lines if ln.startswith(f"| [{MUST_A}]("))
    assert "expected version 1 \\| got 0 second line" in a_row
    case_row = next(ln for ln in lines if ln.startswith("| `cases/test_handshake.py::test_mp_capable[v6]`"))
    assert case_row.count(" | ") == 5  # six cells, as many as the header
    assert "| fail | 2.25 s |" in case_row and "artefacts/test_mp_capable-v6" in case_row

    assert f"`{UNKNOWN}`" in md and "Warning" in md
    assert f"**Required (MUST-class) requirements failed:** {MUST_C}, {MUST_A}" in md

    not_covered = md.split("## Requirements not covered", 1)[1]
    assert "R3-01" in not_covered and MUST_A not in not_covered.split("Not testable")[0]
    assert "- 3: R3-01, R3-02, R3-04" in not_covered  # R3-03 is covered


def test_junit(tmp_path: Path) -> None:
    path = tmp_path / "junit.xml"
    writers.write_junit(make_results(), path)
    root = ET.parse(path).getroot()
    suites = list(root.iter("testsuite"))
    assert len(suites) == 1 and suites[0].get("name") == "mptcp-conformance"
    cases = list(root.iter("testcase"))
    assert len(cases) == 6
    assert sum(len(c.findall("failure")) for c in cases) == 1
    assert sum(len(c.findall("error")) for c in cases) == 1
    assert sum(len(c.findall("skipped")) for c in cases) == 2
    assert suites[0].get("failures") == "1" and suites[0].get("errors") == "1"
    assert suites[0].get("skipped") == "2" and suites[0].get("tests") == "6"

    by_name = {(c.get("classname"), c.get("name")): c for c in cases}
    failed = by_name[("cases.test_handshake", "test_mp_capable[v6]")]
    assert failed.get("time") == "2.250"
    failure = failed.find("failure")
    assert failure.get("message") == "expected version 1 | got 0"
    assert "\x00" not in failure.text and "\x1b" not in failure.text and "[31m" not in failure.text
    assert "second line red" in failure.text
    reqs = [p.get("value") for p in failed.iter("property") if p.get("name") == "requirement"]
    assert reqs == [MUST_A, MUST_C]
    assert ("cases.test_join", "TestRemove::test_remove") in by_name
    skipped = by_name[("cases.test_join", "test_join")].find("skipped")
    assert skipped.get("message") == "kernel lacks MP_JOIN knob"


def test_junit_arbitrary_text(tmp_path: Path) -> None:
    nasty = "".join(chr(i) for i in range(0x20)) + "<&>\"' \ud800 \ufffe end ]]>"
    results = RunResults(suite_version=nasty, started="x", environment={"k": nasty}, cases=[
        CaseResult(id=f"a/b.py::t[{nasty}]", name="t", description=nasty, requirements=[nasty],
                   outcome="error", reason=nasty, evidence=[nasty])])
    path = tmp_path / "junit.xml"
    writers.write_junit(results, path)
    error = ET.parse(path).getroot().find(".//error")
    assert error is not None and error.text.endswith("end ]]>")
    writers.write_markdown(results, CAT, tmp_path / "report.md")  # must not raise either


def test_artefact_links_relative_to_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The plugin records folders relative to the working directory or absolute; report.md sits in
    # the report folder, so its links must be relative to that folder.
    monkeypatch.chdir(tmp_path)
    folder = Path("reports") / "20250102T030405Z"
    (folder / "artefacts" / "a").mkdir(parents=True)
    (folder / "artefacts" / "b").mkdir(parents=True)
    base = make_results()
    base.cases[0].artefacts = str(folder / "artefacts" / "a")  # cwd-relative
    base.cases[1].artefacts = str((folder / "artefacts" / "b").absolute())  # absolute
    base.cases[2].artefacts = "artefacts/a"  # already relative to the report folder
    writers.write_all(base, CAT, folder)
    md = (folder / "report.md").read_text()
    assert md.count("[artefacts/a](artefacts/a)") == 2
    assert "[artefacts/b](artefacts/b)" in md


def test_write_all_and_json_round_trip(tmp_path: Path) -> None:
    results = make_results()
    folder = tmp_path / "reports" / "20250102T030405Z"
    out = writers.write_all(results, CAT, folder)
    assert out == {"json": folder / "results.json", "markdown": folder / "report.md",
                   "junit": folder / "junit.xml", "html": folder / "report.html"}
    assert sorted(p.name for p in folder.iterdir()) == ["junit.xml", "report.html", "report.md", "results.json"]
    assert RunResults.read_json(out["json"]) == results


def test_failing_writer_leaves_no_partial_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(results: RunResults, path: Path) -> None:
        Path(path).write_text("<testsuites>")  # half-written, then the writer dies
        raise RuntimeError("writer died")

    monkeypatch.setattr(writers, "write_junit", broken)
    folder = tmp_path / "report"
    with pytest.raises(RuntimeError, match="writer died"):
        writers.write_all(make_results(), CAT, folder)
    assert list(folder.iterdir()) == []


def test_failing_writer_keeps_previous_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "report"
    writers.write_all(make_results(), CAT, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    def full(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(writers, "write_markdown", full)
    with pytest.raises(OSError):
        writers.write_all(RunResults(suite_version="9", started="y"), CAT, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_a_failed_check_counts_only_against_its_requirement() -> None:
    """A case naming two requirements whose only failed check is about one of them."""
    case = CaseResult(
        id="cases/test_x.py::test_x", name="test_x", description="", requirements=[MUST_A, MUST_C],
        outcome="fail", reason="1 of 2 checks failed",
        checks=[{"requirement": MUST_A, "ok": False, "text": f"[{MUST_A}] flags: expected 1; seen 3"},
                {"requirement": MUST_C, "ok": True, "text": f"[{MUST_C}] token matches"}])
    results = RunResults(suite_version="0", started="t", cases=[case])
    verdicts = writers.requirement_verdicts(results, CAT)
    assert verdicts[MUST_A].verdict == "fail"
    assert verdicts[MUST_C].verdict == "pass"
    assert f"[{MUST_C}] token matches" in verdicts[MUST_C].evidence
    assert not any("flags" in e for e in verdicts[MUST_C].evidence)
    # A failed check about the whole case (no requirement) counts against every requirement.
    case.checks.append({"requirement": None, "ok": False, "text": "data arrived corrupted"})
    verdicts = writers.requirement_verdicts(results, CAT)
    assert verdicts[MUST_C].verdict == "fail"


def test_malformed_results_file_is_one_clear_error(tmp_path) -> None:
    from conformance.errors import InputError

    bad = tmp_path / "results.json"
    bad.write_text('{"schema_version": 2, "cases": [')
    with pytest.raises(InputError, match=r"results.json:1:\d+: not valid JSON"):
        RunResults.read_json(bad)
    bad.write_text('{"schema_version": 2, "suite_version": "0", "started": "t", "cases": [{"id": "x"}]}')
    with pytest.raises(InputError, match=r"cases\[0\]: missing field\(s\) name"):
        RunResults.read_json(bad)


def test_a_known_deviation_is_reported_as_such_not_as_pass_or_fail() -> None:
    """A passed case whose only failed check is a known deviation of the implementation."""
    checks = [{"requirement": SHOULD_B, "ok": False, "deviation": "linux: ephemeral source port",
               "text": f"[{SHOULD_B}] passive: join port: expected 40000; seen 51234"},
              {"requirement": MUST_C, "ok": True, "text": f"[{MUST_C}] token matches"}]
    case = CaseResult(id="cases/test_x.py::test_x", name="test_x", description="",
                      requirements=[SHOULD_B, MUST_C], outcome="pass", checks=checks)
    results = RunResults(suite_version="0", started="t", cases=[case])
    verdicts = writers.requirement_verdicts(results, CAT)
    assert verdicts[SHOULD_B].verdict == "deviation"
    assert verdicts[MUST_C].verdict == "pass"
    assert any("known deviation" in e for e in verdicts[SHOULD_B].evidence)
    md = writers.render_markdown(results, CAT)
    assert "Known deviation" in md
    # A real failure of the same requirement in another case still makes it a failure.
    other = CaseResult(id="cases/test_y.py::test_y", name="test_y", description="", requirements=[SHOULD_B],
                       outcome="fail", checks=[{"requirement": SHOULD_B, "ok": False, "text": "bad"}])
    results.cases.append(other)
    assert writers.requirement_verdicts(results, CAT)[SHOULD_B].verdict == "fail"


def test_expect_keeps_known_deviations_out_of_the_failures() -> None:
    from conformance.verdict import Expect

    e = Expect()
    e.that(False, "join source port", expected="40000", seen="51234", rid=SHOULD_B, deviation="linux: ephemeral")
    e.that(True, "token", expected="match", seen="match", rid=MUST_C)
    assert e.failures == []
    e.verdict((SHOULD_B, MUST_C))  # does not raise
    assert "known deviation: linux: ephemeral" in e.evidence()[0]
    e.that(False, "flags", expected="1", seen="3", rid=MUST_C)
    with pytest.raises(AssertionError):
        e.verdict()


def test_known_deviations_file_is_valid_and_bad_files_are_one_error(tmp_path: Path) -> None:
    from conformance.errors import InputError
    from conformance.requirements.deviations import known_deviations

    linux = known_deviations()["linux"]
    assert linux and all(rid in CAT for rid in linux)  # every deviation names a catalogued requirement
    bad = tmp_path / "deviations.yaml"
    bad.write_text("schema: 1\ndeviations:\n  linux:\n    - id: R3.1-14\n")
    with pytest.raises(InputError, match=r"deviations\.linux\[0\]"):
        known_deviations(bad)


def test_an_oracle_disagreement_is_neither_a_pass_nor_a_failure_of_the_implementation() -> None:
    """A case whose only failed checks are oracle checks: the requirement has no verdict yet."""
    checks = [{"requirement": MUST_A, "ok": True, "text": f"[{MUST_A}] keys differ"},
              {"requirement": None, "ok": False, "oracle": True,
               "text": "oracle: tshark's MPTCP analysis agrees with the passive rules: expected no disagreement"}]
    case = CaseResult(id="cases/test_x.py::test_x", name="test_x", description="", requirements=[MUST_A],
                      outcome="oracle-disagreement", reason="1 of 2 checks failed", checks=checks)
    results = RunResults(suite_version="0", started="t", cases=[case])
    assert writers.requirement_verdicts(results, CAT)[MUST_A].verdict == "oracle-disagreement"
    assert writers.exit_code(results, CAT) == writers.EXIT_ORACLE
    assert "| MUST | " in writers.render_markdown(results, CAT)
    failure = writers.render_junit(results).getroot().find(".//failure")
    assert failure is not None and failure.get("message").startswith("oracle disagreement: ")


def test_exit_codes_follow_the_required_requirements() -> None:
    def run(*cases: CaseResult) -> RunResults:
        return RunResults(suite_version="0", started="t", cases=list(cases))

    def case(rid: str, outcome: str, n: int = 0) -> CaseResult:
        return CaseResult(id=f"cases/t.py::c{n}", name="c", description="", requirements=[rid], outcome=outcome,
                          checks=[{"requirement": rid, "ok": outcome == "pass", "text": "x"}])

    assert writers.exit_code(run(case(MUST_A, "pass")), CAT) == writers.EXIT_OK
    assert writers.exit_code(run(case(MUST_A, "fail")), CAT) == writers.EXIT_REQUIRED_FAILED
    # A failed SHOULD is reported, not required, unless --strict.
    assert writers.exit_code(run(case(SHOULD_B, "fail")), CAT) == writers.EXIT_OK
    assert writers.exit_code(run(case(SHOULD_B, "fail")), CAT, strict=True) == writers.EXIT_REQUIRED_FAILED
    assert writers.exit_code(run(case(MAY_D, "pass"), case(SHOULD_B, "error", 1)), CAT) == writers.EXIT_ENVIRONMENT
    # A required failure outranks an errored case and an oracle disagreement.
    mixed = run(case(MUST_A, "fail"), case(MAY_D, "error", 1), case(MUST_C, "oracle-disagreement", 2))
    assert writers.exit_code(mixed, CAT) == writers.EXIT_REQUIRED_FAILED


def test_implementations_and_middleboxes_are_kept_and_shown(tmp_path: Path) -> None:
    from conformance.implementations import describe

    results = make_results()
    results.implementations = {"linux": describe("linux")}
    results.cases[0].middleboxes = ["snat on r1 (c2s)"]
    linux = results.implementations["linux"]
    assert linux["kind"] == "kernel" and linux["version"] and "path_manager" in linux["configuration"]
    assert describe("some-stack") == {"kind": "unknown", "version": None, "configuration": {}}
    out = writers.write_all(results, CAT, tmp_path)
    again = RunResults.read_json(out["json"])
    assert again.implementations == results.implementations and again.cases[0].middleboxes == ["snat on r1 (c2s)"]
    assert "## Implementations" in out["markdown"].read_text()
    html = out["html"].read_text()
    assert 'id="implementations"' in html and "middlebox snat on r1 (c2s)" in html
    # A results.json written before these fields existed still reads (they take their defaults).
    data = json.loads(out["json"].read_text())
    del data["implementations"]
    del data["cases"][0]["middleboxes"]
    assert RunResults.from_dict(data).cases[0].middleboxes == []
