"""The interop matrix: client x server x scenario, from ci/matrix.yaml (docs/matrix.md).

`load_matrix` reads and checks the declaration; `run_pair` runs one pair's cases as one pytest
session (its own process, so each pair gets a fresh plugin state and its own report folder);
`aggregate` reads the pairs' results.json files, wherever they were produced (one machine, or
one CI runner a pair), and writes matrix.json and matrix.html."""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from conformance.errors import InputError
from conformance.implementations import get as get_implementation
from conformance.net.topo import FAMILIES
from conformance.report.model import RunResults

DEFAULT_PATH = Path(__file__).resolve().parents[1] / "ci" / "matrix.yaml"
CASES_DIR = Path(__file__).resolve().parents[1] / "cases"
ROLES = ("client", "server")
SCHEMA = 1
# A cell shows its cases' worst outcome: what needs looking at comes first.
SEVERITY = ("fail", "error", "oracle-disagreement", "unsupported", "skip", "pass")
ABBREVIATION = {"pass": "P", "fail": "F", "error": "E", "oracle-disagreement": "O", "unsupported": "U",
                "skip": "S", "not-run": "-"}


@dataclass
class Scenario:
    name: str
    summary: str
    cases: list[str]  # node IDs relative to cases/: a file, or file::case


@dataclass
class Matrix:
    source: Path
    implementations: dict[str, list[str]]  # name -> roles it can play
    families: list[str]
    scenarios: dict[str, Scenario]

    def players(self, role: str) -> list[str]:
        return [name for name, roles in self.implementations.items() if role in roles]

    def select(self, patterns: str | None) -> list[Scenario]:
        """Scenarios whose name matches one of the comma-separated glob `patterns` (all: None)."""
        if not patterns:
            return list(self.scenarios.values())
        wanted = [p.strip() for p in patterns.split(",") if p.strip()]
        chosen = [s for s in self.scenarios.values() if any(fnmatch.fnmatchcase(s.name, p) for p in wanted)]
        if not chosen:
            raise InputError(f"--cases {patterns!r}: matches no scenario of {self.source} "
                             f"({', '.join(self.scenarios)})")
        return chosen

    def pairs(self, clients: str | None, servers: str | None) -> list[tuple[str, str]]:
        return [(c, s) for c in self._axis("client", clients) for s in self._axis("server", servers)]

    def _axis(self, role: str, names: str | None) -> list[str]:
        if not names:
            return self.players(role)
        out = [n.strip() for n in names.split(",") if n.strip()]
        for n in out:
            if n not in self.implementations:
                raise InputError(f"--{role} {n!r}: not an implementation of {self.source} "
                                 f"({', '.join(self.implementations)})")
            if role not in self.implementations[n]:
                raise InputError(f"--{role} {n!r}: {self.source} does not let it play the {role}")
        return out


def load_matrix(path: Path = DEFAULT_PATH) -> Matrix:
    """Read and check a matrix file; InputError naming the file and the place of the first problem."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise InputError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping with schema, implementations, families and scenarios")
    if data.get("schema") != SCHEMA:
        raise InputError(f"{path}: schema: {data.get('schema')!r}, this tool reads {SCHEMA}")
    unknown = set(data) - {"schema", "implementations", "families", "scenarios"}
    if unknown:
        raise InputError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}")

    impls = data.get("implementations")
    if not isinstance(impls, dict) or not impls:
        raise InputError(f"{path}: implementations: expected a mapping of at least one implementation")
    implementations = {}
    for name, spec in impls.items():
        where = f"{path}: implementations.{name}"
        try:
            get_implementation(name)
        except ValueError as exc:
            raise InputError(f"{where}: {exc}") from None
        roles = (spec or {}).get("roles", list(ROLES)) if isinstance(spec, dict) or spec is None else None
        if not isinstance(roles, list) or not roles or any(r not in ROLES for r in roles):
            raise InputError(f"{where}.roles: expected a list of {' and '.join(ROLES)}")
        implementations[name] = roles

    families = data.get("families", ["ipv4"])
    if not isinstance(families, list) or not families or any(f not in FAMILIES for f in families):
        raise InputError(f"{path}: families: expected a list of {', '.join(FAMILIES)}")

    scen = data.get("scenarios")
    if not isinstance(scen, dict) or not scen:
        raise InputError(f"{path}: scenarios: expected a mapping of at least one scenario")
    scenarios = {}
    for name, spec in scen.items():
        where = f"{path}: scenarios.{name}"
        if not isinstance(spec, dict):
            raise InputError(f"{where}: expected a mapping with summary and cases")
        cases = spec.get("cases")
        if not isinstance(cases, list) or not cases or not all(isinstance(c, str) for c in cases):
            raise InputError(f"{where}.cases: expected a list of node IDs under cases/")
        for i, case in enumerate(cases):
            if not (CASES_DIR / case.split("::")[0]).is_file():
                raise InputError(f"{where}.cases[{i}]: {case.split('::')[0]} is not a file under {CASES_DIR}")
        scenarios[str(name)] = Scenario(str(name), str(spec.get("summary", "")), cases)
    return Matrix(path, implementations, families, scenarios)


def pair_name(client: str, server: str) -> str:
    return f"{client}--{server}"


def run_pair(matrix: Matrix, client: str, server: str, scenarios: list[Scenario], out: Path, *,
             families: list[str] | None = None, progress: bool = True, extra: list[str] | None = None) -> int:
    """One pytest session: `client` and `server` over the scenarios' cases; its report goes to
    out/<client>--<server>/. Returns pytest's exit code."""
    folder = out / pair_name(client, server)
    argv = [sys.executable, "-m", "pytest", *(str(CASES_DIR / c) for s in scenarios for c in s.cases),
            "-p", "no:cacheprovider", "-o", "addopts=--strict-markers", "--mptcp-report", str(folder),
            "--mptcp-client", client, "--mptcp-server", server]
    for fam in families or matrix.families:
        argv += ["--mptcp-family", fam]
    if progress:
        argv += ["--mptcp-progress", "-p", "no:terminal"]
    else:
        argv += ["-q"]
    env = dict(os.environ)
    env.pop("MPTCP_CONFORMANCE_REPORT", None)  # the pair's own folder, not an enclosing run's
    return subprocess.run(argv + list(extra or []), env=env, check=False).returncode


@dataclass
class Cell:
    scenario: str
    outcome: str  # the worst of its cases' outcomes, or "not-run"
    counts: dict[str, int] = field(default_factory=dict)
    href: str | None = None  # the artefact folder of the case the outcome comes from
    reason: str | None = None


@dataclass
class Pair:
    client: str
    server: str
    folder: str  # relative to the matrix folder
    cells: list[Cell]
    counts: dict[str, int]


def _in_scenario(case_id: str, scenario: Scenario) -> bool:
    path = case_id.split("::")[0]
    for entry in scenario.cases:
        file, _, name = entry.partition("::")
        if path.endswith(file) and (not name or case_id.split("::", 1)[1].split("[")[0] == name):
            return True
    return False


def pair_cells(results: RunResults, scenarios: list[Scenario], folder: str) -> list[Cell]:
    cells = []
    for scenario in scenarios:
        cases = [c for c in results.cases if _in_scenario(c.id, scenario)]
        if not cases:
            cells.append(Cell(scenario.name, "not-run"))
            continue
        counts: dict[str, int] = {}
        for c in cases:
            counts[c.outcome] = counts.get(c.outcome, 0) + 1
        worst = min(cases, key=lambda c: SEVERITY.index(c.outcome))
        href = f"{folder}/{worst.artefacts}" if worst.artefacts else f"{folder}/report.html"
        cells.append(Cell(scenario.name, worst.outcome, counts, href, worst.reason))
    return cells


def aggregate(matrix: Matrix, scenarios: list[Scenario], pair_folders: list[Path], out: Path) -> dict:
    """matrix.json and matrix.html in `out` from the pairs' report folders; returns matrix.json's data."""
    from conformance.report.matrix_html import render_matrix

    pairs = []
    for folder in pair_folders:
        results = RunResults.read_json(folder / "results.json")
        client, _, server = folder.name.partition("--")
        if not server:
            raise InputError(f"{folder}: not a pair folder (<client>--<server>)")
        rel = os.path.relpath(folder, out)
        pairs.append(Pair(client, server, rel, pair_cells(results, scenarios, rel), results.counts()))
    data = {"schema": SCHEMA, "source": str(matrix.source), "scenarios": [asdict(s) for s in scenarios],
            "clients": sorted({p.client for p in pairs}, key=list(matrix.implementations).index),
            "servers": sorted({p.server for p in pairs}, key=list(matrix.implementations).index),
            "pairs": [asdict(p) for p in pairs]}
    out.mkdir(parents=True, exist_ok=True)
    page = render_matrix(data)
    for name, text in (("matrix.json", json.dumps(data, indent=2) + "\n"), ("matrix.html", page)):
        with tempfile.NamedTemporaryFile("w", dir=out, prefix=f".{name}.", delete=False) as tmp:
            tmp.write(text)
        Path(tmp.name).replace(out / name)
    return data
