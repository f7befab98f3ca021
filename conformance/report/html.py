"""report.html: the compliance report as one self-contained page (jinja2), filterable offline.

The verdicts are report.md's (writers.requirement_verdicts). On top of them, every capture frame
that evidence names ("s1-eth0.pcap frame 2449") links to a card further down the page that
shows the frame as our codec decodes it, with a link to the capture file and the tshark command
that opens it there: from a failed requirement, one click opens its evidence, a second reaches
the frame. Filters (RFC section, level, verdict, free text) run in the page, without a network."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from conformance.errors import InputError
from conformance.report.model import OUTCOMES, CaseResult, RunResults
from conformance.report.plots import client_captures, sequence_plot
from conformance.report.writers import (
    LEVEL_GROUPS,
    VERDICTS,
    _artefact_href,
    _case_labels,
    _evidence_of,
    _flatten,
    _wall_time,
    case_outcome_for,
    coverage,
    is_testable,
    level_group,
    requirement_verdicts,
)
from conformance.requirements.catalogue import Catalogue

_FRAME = re.compile(r"([\w.\-]+\.pcap) frame (\d+)")
_CARDS_PER_CASE = 40  # a case citing more frames than this links the rest to the capture only
_TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("conformance.report", "templates"),
                                autoescape=True, trim_blocks=True, lstrip_blocks=True,
                                undefined=jinja2.StrictUndefined)


@dataclass
class FrameCard:
    anchor: str
    pcap: str  # file name, as evidence names it
    frame: int
    href: str | None  # the capture, relative to the report's folder (None: not in the artefacts)
    decoded: str  # the frame as our codec reads it, or why it cannot be shown


@dataclass
class Part:
    """A piece of an evidence sentence: text, or a frame reference (with its card's anchor)."""

    text: str
    anchor: str | None = None


@dataclass
class CaseView:
    case: CaseResult
    anchor: str
    label: str
    href: str | None  # artefact folder, relative to the report
    checks: list[tuple[str, list[Part]]] = field(default_factory=list)  # (ok|fail|deviation, sentence)
    cards: list[FrameCard] = field(default_factory=list)
    plot: str | None = None  # the sequence/time plot, a PNG data URI


class _Frames:
    """Frame cards, one per (case, capture, frame) cited, decoded once per capture."""

    def __init__(self) -> None:
        self.cards: dict[tuple[str, str, int], FrameCard] = {}
        self._decoded: dict[Path, dict[int, str]] = {}

    def parts(self, view: CaseView, folder: Path | None, text: str) -> list[Part]:
        out: list[Part] = []
        pos = 0
        for m in _FRAME.finditer(text):
            if m.start() > pos:
                out.append(Part(text[pos:m.start()]))
            card = self._card(view, folder, m.group(1), int(m.group(2)))
            out.append(Part(m.group(0), card.anchor if card else None))
            pos = m.end()
        if pos < len(text):
            out.append(Part(text[pos:]))
        return out

    def _card(self, view: CaseView, folder: Path | None, pcap: str, frame: int) -> FrameCard | None:
        key = (view.case.id, pcap, frame)
        if key in self.cards:
            return self.cards[key]
        if len(view.cards) >= _CARDS_PER_CASE:
            return None
        # A capture is in the case's folder, or in a subfolder of one of its runs (transfer-2/,
        # script-<port>/); evidence names the file only, so a name several runs share is ambiguous.
        found = [] if folder is None else [folder / pcap] if (folder / pcap).is_file() else sorted(
            folder.rglob(pcap))
        anchor = f"f{len(self.cards) + 1}"
        if not found:
            card = FrameCard(anchor, pcap, frame, None, "the capture is not in the artefacts")
        else:
            rel = found[0].relative_to(folder).as_posix()
            decoded = self._decode(found[0], frame)
            if len(found) > 1:
                decoded += f"\n(from {rel}: {len(found)} captures of the case bear this name)"
            card = FrameCard(anchor, rel, frame, f"{view.href}/{rel}", decoded)
        self.cards[key] = card
        view.cards.append(card)
        return card

    def _decode(self, path: Path, frame: int) -> str:
        from conformance.observe.segments import decode  # scapy: only when a report has captures

        if path not in self._decoded:
            try:
                self._decoded[path] = {s.frame: str(s) for s in decode(path)}
            except InputError as exc:
                self._decoded[path] = {0: f"unreadable capture: {exc}"}
        table = self._decoded[path]
        return table.get(frame, table.get(0, f"frame {frame} is not a TCP segment of this capture"))


def _folder(artefacts: str | None, base: Path) -> tuple[str | None, Path | None]:
    if not artefacts:
        return None, None
    href = _artefact_href(artefacts, base)
    return href, (base / href).resolve()


def render_html(results: RunResults, catalogue: Catalogue, link_base: Path, *, plots: bool = True) -> str:
    """The report page; links (artefacts, captures) are relative to `link_base`, the report's folder.
    `plots`: draw each case's sequence/time plot from its client captures (matplotlib)."""
    base = Path(link_base).absolute()
    verdicts = requirement_verdicts(results, catalogue)
    labels = _case_labels(results.cases)
    frames = _Frames()
    views: dict[str, CaseView] = {}
    folders: dict[str, Path | None] = {}
    for i, case in enumerate(results.cases, 1):
        href, folder = _folder(case.artefacts, base)
        view = views[case.id] = CaseView(case, f"case-{i}", labels[case.id], href)
        folders[case.id] = folder
        for check in case.checks:
            state = "ok" if check.get("ok") else ("deviation" if check.get("deviation") else "fail")
            view.checks.append((state, frames.parts(view, folder, str(check.get("text", "")))))
        if plots and folder is not None and folder.is_dir():
            view.plot = sequence_plot(client_captures(folder), view.label)

    sections = []
    for section in catalogue.sections():
        rows = []
        for req in (r for r in catalogue if r.section == section):
            v = verdicts[req.id]
            per_case = []
            for cid in v.cases:
                case, view = views[cid].case, views[cid]
                lines = [frames.parts(view, folders[cid], e) for e in _evidence_of(case, req.id)]
                if case.reason and case.outcome != "pass":
                    lines.insert(0, [Part(case.reason.strip().splitlines()[0])])
                per_case.append((view, case_outcome_for(case, req.id), lines))
            rows.append({"req": req, "verdict": v.verdict, "group": level_group(req.level),
                         "testable": is_testable(req), "per_case": per_case})
        sections.append({"name": section, "title": rows[0]["req"].title if rows else "", "rows": rows})
    unknown = [v for rid, v in verdicts.items() if rid not in catalogue]

    cov = coverage(verdicts, catalogue)
    failed_required = [rid for rid, v in verdicts.items()
                       if v.verdict == "fail" and rid in catalogue and catalogue[rid].required]
    page = _TEMPLATES.get_template("report.html.j2").render(
        results=results, environment=list(_flatten(results.environment)),
        implementations=[(name, impl, list(_flatten(impl.get("configuration") or {})))
                         for name, impl in results.implementations.items()],
        wall=_wall_time(results.started, results.finished), counts=results.counts(), outcomes=OUTCOMES,
        coverage=cov, groups=(*LEVEL_GROUPS, "total"), verdict_names=VERDICTS, sections=sections,
        cases=list(views.values()), failed_required=failed_required, unknown=unknown,
        catalogue_name=catalogue.source.name)
    return page
