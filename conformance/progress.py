"""Progress of a long run (`mptcp-conformance run`, or pytest with --mptcp-progress): one rich
progress bar over the cases with the one running and the outcomes so far, then a summary table
per case file. A pytest plugin registered on the controller only (with xdist, the workers' reports
arrive there)."""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from conformance.pytest_plugin import case_outcome

OUTCOMES = ("pass", "fail", "oracle-disagreement", "unsupported", "skip", "error")
_STYLE = {"pass": "green", "fail": "red", "oracle-disagreement": "yellow", "unsupported": "cyan", "skip": "blue",
          "error": "magenta"}


class RunProgress:
    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[counts]}"), TimeElapsedColumn(), console=self.console,
                            transient=False)
        self.task = self.bar.add_task("collecting", total=None, counts="")
        self.outcome: dict[str, str] = {}  # nodeid -> outcome so far
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: Counter[str] = Counter()
        self.started = False

    def _start(self, total: int) -> None:
        self.bar.update(self.task, total=total, description="cases")
        if not self.started:
            self.bar.start()
            self.started = True

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        if session.items:  # without xdist; with it the controller learns the count below
            self._start(len(session.items))

    def pytest_xdist_node_collection_finished(self, node, ids: list[str]) -> None:
        self._start(len(ids))

    def pytest_runtest_logstart(self, nodeid: str, location: tuple) -> None:
        self.bar.update(self.task, description=_short(nodeid))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.seconds[report.nodeid] += report.duration
        now = self.outcome[report.nodeid] = case_outcome(self.outcome.get(report.nodeid, "pass"), report)
        if report.when == "teardown":
            self.counts[now] += 1
            shown = " ".join(f"[{_STYLE[o]}]{self.counts[o]} {o}[/]" for o in OUTCOMES if self.counts[o])
            self.bar.update(self.task, advance=1, counts=shown)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.started:
            self.bar.stop()
        self.console.print(self.summary())

    def summary(self) -> Table:
        by_file: dict[str, Counter[str]] = defaultdict(Counter)
        secs: dict[str, float] = defaultdict(float)
        for nodeid, outcome in self.outcome.items():
            name = nodeid.split("::", 1)[0]
            by_file[name][outcome] += 1
            secs[name] += self.seconds[nodeid]
        table = Table(title="mptcp-conformance: cases by file", box=box.SIMPLE_HEAD, pad_edge=False)
        # Fits 80 columns (a console that is not a terminal): file names without their folder, short
        # headings, nothing cut.
        table.add_column("file", no_wrap=True, min_width=max((len(_file(n)) for n in by_file), default=4))
        for o in OUTCOMES:
            table.add_column(_HEADING.get(o, o), justify="right", style=_STYLE[o], no_wrap=True)
        table.add_column("time", justify="right", no_wrap=True)
        for name in sorted(by_file):
            table.add_row(_file(name), *(str(by_file[name][o]) for o in OUTCOMES), f"{secs[name]:.1f} s")
        table.add_row("total", *(str(sum(c[o] for c in by_file.values())) for o in OUTCOMES),
                      f"{sum(secs.values()):.1f} s", style="bold")
        return table


_HEADING = {"oracle-disagreement": "oracle", "unsupported": "unsup"}  # the legend is the docs' outcome table


def _short(nodeid: str) -> str:
    return nodeid.rsplit("/", 1)[-1]


def _file(path: str) -> str:
    """A case file as the summary shows it: test_s3_7_middleboxes.py -> s3_7_middleboxes."""
    return _short(path).removeprefix("test_").removesuffix(".py")
