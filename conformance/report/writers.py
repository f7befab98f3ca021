"""Renderings of one run's results: per-requirement verdicts, report.md, junit.xml, and the whole folder.

Everything here is derived from RunResults plus the requirement catalogue, so a report can be
re-rendered later from results.json alone (docs/results.md describes the files and the rules)."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from conformance.report.model import OUTCOMES, CaseResult, RunResults
from conformance.requirements.catalogue import Catalogue, Requirement

SUITE_NAME = "mptcp-conformance"
VERDICTS = ("pass", "deviation", "fail", "oracle-disagreement", "skip", "not-covered")
# Exit codes of `run` and `report` (docs/results.md): every required requirement holds; one failed;
# the environment or an input broke (a case errored); only our oracles disagreed.
EXIT_OK, EXIT_REQUIRED_FAILED, EXIT_ENVIRONMENT, EXIT_ORACLE = 0, 1, 2, 3
LEVEL_GROUPS = ("MUST", "SHOULD", "MAY", "implicit")
_LEVEL_GROUP = {
    "MUST": "MUST", "MUST NOT": "MUST", "REQUIRED": "MUST", "SHALL": "MUST", "SHALL NOT": "MUST",
    "SHOULD": "SHOULD", "SHOULD NOT": "SHOULD", "RECOMMENDED": "SHOULD", "NOT RECOMMENDED": "SHOULD",
    "MAY": "MAY", "OPTIONAL": "MAY",
    "implicit": "implicit",
}
# Markdown cells stay readable only if evidence is cut short; the full text is in results.json.
_CELL_ITEMS = 2
_CELL_ITEM_CHARS = 160
_REASON_CHARS = 200
# Assertion messages often carry terminal colours; the escape byte alone would leave "[31m" behind.
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# XML 1.0 cannot carry these at all (not even as character references), so they are dropped;
# lone surrogates (from surrogateescape-decoded tool output) would break UTF-8 encoding.
_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff\ufffe\uffff]")


@dataclass(frozen=True)
class RequirementVerdict:
    id: str
    verdict: str  # pass | deviation | fail | skip | not-covered
    cases: list[str] = field(default_factory=list)  # ids of the cases naming the requirement
    evidence: list[str] = field(default_factory=list)  # failure/skip reasons first, then wire evidence
    artefacts: list[str] = field(default_factory=list)  # artefact folders of those cases


def level_group(level: str) -> str:
    return _LEVEL_GROUP.get(level, "implicit")


def is_testable(req: Requirement) -> bool:
    # Withdrawn entries stay in the catalogue only so their IDs are never reused.
    return req.testability != "not-testable" and not req.withdrawn


def requirement_verdicts(results: RunResults, catalogue: Catalogue) -> dict[str, RequirementVerdict]:
    """One verdict per catalogue requirement (catalogue order), then per unknown ID (first-seen order)."""
    naming: dict[str, list[CaseResult]] = {rid: [] for rid in catalogue.by_id}
    for case in results.cases:
        for rid in dict.fromkeys(case.requirements):  # a case naming an ID twice counts once
            naming.setdefault(rid, []).append(case)
    labels = _case_labels(results.cases)
    return {rid: _aggregate(rid, cases, labels) for rid, cases in naming.items()}


def case_outcome_for(case: CaseResult, rid: str) -> str:
    """What `case` says about requirement `rid`.

    A failed case counts against `rid` unless every failed check names another requirement: then
    `rid` held in this case. A failure with no failed check (an exception) counts against all."""
    deviates = any(not c.get("ok") and c.get("deviation") and c.get("requirement") == rid for c in case.checks)
    if case.outcome == "oracle-disagreement":
        return case.outcome  # the requirement's own checks may hold, but its judges do not agree
    if case.outcome != "fail":
        return "deviation" if deviates and case.outcome == "pass" else case.outcome
    failed = [c for c in case.checks if not c.get("ok") and not c.get("deviation")]
    if deviates and all(c.get("requirement") not in (None, rid) for c in failed):
        return "deviation"
    if failed and all(c.get("requirement") not in (None, rid) for c in failed):
        return "pass"
    return "fail"


def _aggregate(rid: str, cases: list[CaseResult], labels: dict[str, str]) -> RequirementVerdict:
    outcomes = {case_outcome_for(c, rid) for c in cases}
    if not cases:
        verdict = "not-covered"
    elif outcomes & {"fail", "error"}:
        # An error means the requirement could not be shown to hold; it must not read as a pass.
        verdict = "fail"
    elif "oracle-disagreement" in outcomes:
        verdict = "oracle-disagreement"  # no verdict until our judges agree
    elif "deviation" in outcomes:
        verdict = "deviation"  # a known deviation of the implementation: reported, not hidden
    elif "pass" in outcomes:
        verdict = "pass"
    else:
        verdict = "skip"
    reasons: list[str] = []
    for c in cases:
        outcome = case_outcome_for(c, rid)
        if outcome in ("fail", "error", "deviation", "oracle-disagreement") or (
                outcome in ("skip", "unsupported") and verdict == "skip"):
            word = {"skip": "skipped", "deviation": "known deviation"}.get(outcome, outcome)
            reasons.append(f"{labels[c.id]}: {word}" + (f": {c.reason}" if c.reason else ""))
    evidence = [e for c in cases for e in _evidence_of(c, rid)]
    return RequirementVerdict(
        id=rid,
        verdict=verdict,
        cases=[c.id for c in cases],
        evidence=list(dict.fromkeys(reasons + evidence)),
        artefacts=list(dict.fromkeys(c.artefacts for c in cases if c.artefacts)),
    )


def _evidence_of(case: CaseResult, rid: str) -> list[str]:
    # Checks about one requirement belong to it only; a case naming several requirements would
    # otherwise credit each with the others' observations.
    if case.checks:
        return [c["text"] for c in case.checks if c.get("requirement") in (None, rid)]
    return list(case.evidence)


def _case_labels(cases: Iterable[CaseResult]) -> dict[str, str]:
    # Node ids are long; the part after the file is enough unless two files share a test name.
    short = {c.id: c.id.split("::", 1)[-1] for c in cases}
    uses = Counter(short.values())
    return {cid: (cid if uses[s] > 1 else s) for cid, s in short.items()}


# ----------------------------------------------------------------------------------------- Markdown


def _cell(text: str) -> str:
    # A raw '|' ends the cell and a newline ends the row; '<' could open an HTML tag and hide text.
    text = " ".join(str(text).split())
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;")


def _code(text: str) -> str:
    # Inside a code span escapes are literal, except that GFM tables still split on a bare '|'.
    return "`" + " ".join(str(text).split()).replace("`", "'").replace("|", "\\|") + "`"


def _short(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _evidence_cell(items: list[str]) -> str:
    shown = [_cell(_short(e, _CELL_ITEM_CHARS)) for e in items[:_CELL_ITEMS]]
    if len(items) > _CELL_ITEMS:
        shown.append(f"(+{len(items) - _CELL_ITEMS} more in results.json)")
    return "<br>".join(shown)


def _link(target: str) -> str:
    dest = f"<{target}>" if re.search(r"[\s()]", target) else target
    return f"[{_cell(target)}]({dest})"


def _artefact_href(artefacts: str, base: Path | None) -> str:
    """The artefact folder as seen from report.md, so links survive moving the report folder."""
    if base is None:
        return artefacts
    folder = Path(artefacts)
    if not folder.is_absolute():
        if (base / folder).exists():  # already relative to the report folder
            return folder.as_posix()
        folder = Path.cwd() / folder  # recorded relative to the run's working directory
    return Path(os.path.relpath(folder, base.absolute())).as_posix()


def _flatten(data: dict, prefix: str = "") -> Iterable[tuple[str, str]]:
    # environment is free-form (tools may report nested version dicts); the table needs flat rows.
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _flatten(value, f"{name}.")
        elif isinstance(value, list | tuple):
            yield name, ", ".join(str(v) for v in value)
        else:
            yield name, "" if value is None else str(value)


def _wall_time(started: str, finished: str | None) -> str | None:
    if not finished:
        return None
    try:
        seconds = (datetime.fromisoformat(finished) - datetime.fromisoformat(started)).total_seconds()
    except (ValueError, TypeError):  # timestamps are only documented as ISO 8601, not guaranteed
        return None
    return f"{seconds:.1f} s"


def _fence(text: str) -> str:
    # A fence longer than any backtick run inside the text cannot be closed by that text.
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def coverage(verdicts: dict[str, RequirementVerdict], catalogue: Catalogue) -> dict[str, dict[str, int]]:
    """Per level group (and "total"): testable, covered, pass, fail, skip, not-covered counts."""
    keys = ("testable", "covered", "pass", "deviation", "fail", "oracle-disagreement", "skip", "not-covered")
    out = {g: dict.fromkeys(keys, 0) for g in (*LEVEL_GROUPS, "total")}
    for req in catalogue:
        if not is_testable(req):
            continue
        verdict = verdicts[req.id].verdict
        for group in (level_group(req.level), "total"):
            row = out[group]
            row["testable"] += 1
            row[verdict] += 1
            row["covered"] += verdict != "not-covered"
    return out


def render_markdown(results: RunResults, catalogue: Catalogue, link_base: Path | None = None) -> str:
    """report.md text; artefact links are made relative to `link_base` (the report's folder) if given."""
    verdicts = requirement_verdicts(results, catalogue)
    labels = _case_labels(results.cases)
    lines: list[str] = ["# MPTCP conformance report (RFC 8684)", ""]

    lines += [
        f"- Suite version: {results.suite_version}",
        f"- Results schema: {results.schema_version}",
        f"- Started: {results.started}",
        f"- Finished: {results.finished or 'not finished (run interrupted?)'}",
    ]
    wall = _wall_time(results.started, results.finished)
    if wall:
        lines.append(f"- Wall time: {wall}")
    lines.append("")
    env = list(_flatten(results.environment))
    if env:
        lines += ["## Environment", "", "| Item | Value |", "|---|---|"]
        lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in env]
        lines.append("")

    if results.implementations:
        lines += ["## Implementations", "", "| Name | Kind | Version | Configuration |", "|---|---|---|---|"]
        for name, impl in results.implementations.items():
            config = "; ".join(f"{k}={v}" for k, v in _flatten(impl.get("configuration") or {}))
            lines.append(f"| {_cell(name)} | {_cell(impl.get('kind', ''))} | {_cell(impl.get('version') or '')} "
                         f"| {_cell(config)} |")
        lines.append("")

    counts = results.counts()
    lines += ["## Summary", "", "| Outcome | Cases |", "|---|---:|"]
    lines += [f"| {o} | {counts[o]} |" for o in OUTCOMES]
    lines += [f"| total | {len(results.cases)} |", ""]

    cov = coverage(verdicts, catalogue)
    lines += [
        "Requirement coverage (testable requirements only: testability other than `not-testable`):",
        "",
        "| Level | Testable | Covered | Passed | Known deviation | Failed | Oracle disagreement | Skipped "
        "| Not covered |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for group in (*LEVEL_GROUPS, "total"):
        r = cov[group]
        lines.append(f"| {group} | {r['testable']} | {r['covered']} | {r['pass']} | {r['deviation']} "
                     f"| {r['fail']} | {r['oracle-disagreement']} | {r['skip']} | {r['not-covered']} |")
    lines.append("")

    failed_required = [rid for rid, v in verdicts.items()
                       if v.verdict == "fail" and rid in catalogue and catalogue[rid].required]
    if failed_required:
        lines.append(f"**Required (MUST-class) requirements failed:** {', '.join(failed_required)}")
    else:
        lines.append("No required (MUST-class) requirement failed.")
    lines.append("")

    unknown = [v for rid, v in verdicts.items() if rid not in catalogue]
    for v in unknown:
        names = ", ".join(_code(labels[c]) for c in v.cases)
        lines.append(f"> **Warning:** requirement ID {_code(v.id)} is not in the catalogue "
                     f"({catalogue.source.name}); named by {names}; verdict {v.verdict}.")
    if unknown:
        lines.append("")

    lines += ["## Requirements by RFC section", ""]
    any_covered = False
    for section in catalogue.sections():
        reqs = [r for r in catalogue if r.section == section and verdicts[r.id].verdict != "not-covered"]
        if not reqs:
            continue
        any_covered = True
        lines += [f"### {section} {reqs[0].title}", "",
                  "| ID | Level | Summary | Verdict | Cases | Evidence |", "|---|---|---|---|---|---|"]
        for r in reqs:
            v = verdicts[r.id]
            cases = ", ".join(_code(labels[c]) for c in v.cases)
            lines.append(f"| [{r.id}]({r.url}) | {r.level} | {_cell(r.summary)} | {v.verdict} "
                         f"| {cases} | {_evidence_cell(v.evidence)} |")
        lines.append("")
    if not any_covered:
        lines += ["No case names a catalogue requirement.", ""]

    lines += ["## Cases", ""]
    if results.cases:
        lines += ["| Case | Outcome | Duration | Requirements | Reason | Artefacts |",
                  "|---|---|---:|---|---|---|"]
        for c in results.cases:
            reason = _cell(_short(c.reason, _REASON_CHARS)) if c.reason and c.outcome != "pass" else ""
            arte = _link(_artefact_href(c.artefacts, link_base)) if c.artefacts else ""
            lines.append(f"| {_code(c.id)} | {c.outcome} | {c.duration_s:.2f} s "
                         f"| {_cell(', '.join(dict.fromkeys(c.requirements)))} | {reason} | {arte} |")
        lines.append("")
    else:
        lines += ["No cases ran.", ""]

    # The table cuts reasons short; failures are what people read the report for, so repeat them whole.
    broken = [c for c in results.cases if c.outcome in ("fail", "error", "oracle-disagreement") and c.reason]
    if broken:
        lines += ["### Failures and errors", ""]
        for c in broken:
            fence = _fence(c.reason or "")
            lines += [f"#### {_code(c.id)} ({c.outcome})", "", fence, (c.reason or "").rstrip(), fence, ""]

    lines += ["## Requirements not covered", ""]
    gaps = [r for r in catalogue if is_testable(r) and verdicts[r.id].verdict == "not-covered"]
    if gaps:
        lines.append(f"{len(gaps)} testable requirements no case names:")
        lines.append("")
        for section in catalogue.sections():
            ids = [r.id for r in gaps if r.section == section]
            if ids:
                lines.append(f"- {section}: {', '.join(ids)}")
    else:
        lines.append("Every testable requirement is named by at least one case.")
    untestable = [r.id for r in catalogue if not is_testable(r)]
    if untestable:
        lines += ["", f"Not testable (excluded from coverage): {', '.join(untestable)}"]
    lines.append("")
    return "\n".join(lines)


def write_markdown(results: RunResults, catalogue: Catalogue, path: Path, *,
                   link_base: Path | None = None) -> None:
    """Write report.md to `path`; artefact links are relative to `link_base` (default: path's folder)."""
    path = Path(path)
    text = render_markdown(results, catalogue, link_base or path.parent)
    # Terminal escapes and NULs from tool output would garble viewers; tabs and newlines are fine.
    _atomic_write_text(path, _CONTROL.sub("", _ANSI.sub("", text)))


# -------------------------------------------------------------------------------------------- JUnit


def _xml_text(text: object) -> str:
    return _XML_ILLEGAL.sub("", _ANSI.sub("", "" if text is None else str(text)))


def _junit_names(node_id: str) -> tuple[str, str]:
    # Same convention as pytest's junitxml, so CI views group by test module.
    if "::" not in node_id:
        return SUITE_NAME, node_id
    file_part, rest = node_id.split("::", 1)
    module = file_part.removesuffix(".py").replace("/", ".").replace("\\", ".")
    return module, rest


def render_junit(results: RunResults) -> ET.ElementTree:
    counts = results.counts()
    total_time = f"{sum(c.duration_s for c in results.cases):.3f}"
    failures = str(counts["fail"] + counts["oracle-disagreement"])
    root = ET.Element("testsuites", name=SUITE_NAME, tests=str(len(results.cases)),
                      failures=failures, errors=str(counts["error"]),
                      skipped=str(counts["skip"] + counts["unsupported"]), time=total_time)
    suite = ET.SubElement(root, "testsuite", name=SUITE_NAME, tests=str(len(results.cases)),
                          failures=failures, errors=str(counts["error"]),
                          skipped=str(counts["skip"] + counts["unsupported"]), time=total_time,
                          timestamp=_xml_text(results.started))
    props = ET.SubElement(suite, "properties")
    for name, value in (("suite_version", results.suite_version), *_flatten(results.environment)):
        ET.SubElement(props, "property", name=_xml_text(name), value=_xml_text(value))

    for c in results.cases:
        classname, name = _junit_names(c.id)
        case = ET.SubElement(suite, "testcase", classname=_xml_text(classname), name=_xml_text(name),
                             time=f"{c.duration_s:.3f}")
        cprops = ET.SubElement(case, "properties")
        for rid in dict.fromkeys(c.requirements):
            ET.SubElement(cprops, "property", name="requirement", value=_xml_text(rid))
        if c.artefacts:
            ET.SubElement(cprops, "property", name="artefacts", value=_xml_text(c.artefacts))
        reason = _xml_text(c.reason)
        message = reason.strip().splitlines()[0] if reason.strip() else c.outcome
        if c.outcome in ("fail", "oracle-disagreement"):
            kind = "oracle disagreement: " if c.outcome == "oracle-disagreement" else ""
            ET.SubElement(case, "failure", message=kind + message).text = reason
        elif c.outcome == "error":
            ET.SubElement(case, "error", message=message).text = reason
        elif c.outcome in ("skip", "unsupported"):
            ET.SubElement(case, "skipped", message=reason or c.outcome)
        if c.evidence:
            ET.SubElement(case, "system-out").text = _xml_text("\n".join(c.evidence))
    ET.indent(root)
    return ET.ElementTree(root)


def write_junit(results: RunResults, path: Path) -> None:
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        render_junit(results).write(tmp, encoding="utf-8", xml_declaration=True)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def exit_code(results: RunResults, catalogue: Catalogue, *, strict: bool = False) -> int:
    """1 if a required requirement failed (MUST-class; SHOULD-class too with `strict`), else 2 if
    a case errored (the environment or the harness broke), else 3 if only our oracles disagreed,
    else 0. A failed case that names no such requirement fails nothing required."""
    verdicts = requirement_verdicts(results, catalogue)

    def required(rid: str) -> bool:
        if rid not in catalogue:
            return True  # an ID the catalogue lacks cannot be shown optional
        req = catalogue[rid]
        return req.required or (strict and level_group(req.level) in ("SHOULD", "implicit"))

    if any(v.verdict == "fail" and required(rid) for rid, v in verdicts.items()):
        return EXIT_REQUIRED_FAILED
    outcomes = {c.outcome for c in results.cases}
    if "error" in outcomes:
        return EXIT_ENVIRONMENT
    if "oracle-disagreement" in outcomes:
        return EXIT_ORACLE
    return EXIT_OK


# ------------------------------------------------------------------------------------------- Folder


def _tmp_name(path: Path) -> Path:
    # Hidden and suffixed so a crash leftover is neither mistaken for a report nor globbed as one.
    return path.with_name(f".{path.name}.tmp")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = _tmp_name(path)
    try:
        # Lone surrogates (undecodable tool output) cannot be UTF-8; keep them visible, not fatal.
        tmp.write_text(text, encoding="utf-8", errors="backslashreplace")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


FILES = {"json": "results.json", "markdown": "report.md", "junit": "junit.xml", "html": "report.html"}


def write_all(results: RunResults, catalogue: Catalogue, folder: Path) -> dict[str, Path]:
    """Write results.json, report.md, junit.xml and report.html into `folder`; returns {key: path} (FILES).

    All are rendered into a staging directory first and only renamed into place once every
    writer succeeded, so a failing writer leaves neither half-written files nor a mismatched set."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".writing-", dir=folder))
    try:
        staged = {key: staging / name for key, name in FILES.items()}
        results.write_json(staged["json"])
        # Links must point from the final location, not from the staging directory.
        write_markdown(results, catalogue, staged["markdown"], link_base=folder)
        write_junit(results, staged["junit"])
        from conformance.report.html import render_html  # html builds on this module

        page = render_html(results, catalogue, folder)
        _atomic_write_text(staged["html"], _CONTROL.sub("", _ANSI.sub("", page)))
        out = {}
        for key, src in staged.items():
            dest = folder / FILES[key]
            src.replace(dest)  # same filesystem, so each rename is atomic
            out[key] = dest
        return out
    finally:
        shutil.rmtree(staging, ignore_errors=True)
