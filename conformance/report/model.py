"""The results model: the one schema every report, matrix and CI view is rendered from.

Documented in docs/results.md. Bump SCHEMA_VERSION on any incompatible change."""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from conformance.errors import InputError

SCHEMA_VERSION = 3
READABLE = (2, 3)  # each version so far only added to the one before
OUTCOMES = ("pass", "fail", "unsupported", "skip", "error", "oracle-disagreement")


@dataclass
class CaseResult:
    id: str  # pytest node id, stable across runs
    name: str  # short name (the test function)
    description: str  # first line of the case's docstring
    requirements: list[str]  # RFC 8684 requirement IDs the case proves
    outcome: str  # pass | fail | unsupported | skip | error | oracle-disagreement
    reason: str | None = None  # why it failed, skipped or errored
    duration_s: float = 0.0
    artefacts: str | None = None  # folder with pcaps, endpoint reports, counters, logs
    topology: str | None = None
    family: str | None = None
    implementations: dict[str, str] = field(default_factory=dict)  # role -> implementation name
    evidence: list[str] = field(default_factory=list)  # sentences on what was seen on the wire
    # Each check the case made: {"requirement": ID or None (about the whole case), "ok": bool,
    # "text": what was expected and seen}. Lets a failure count against the requirement it is about.
    checks: list[dict] = field(default_factory=list)
    # The middlebox profiles the case attached: "<profile> on <routers> (<direction>)".
    middleboxes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome {self.outcome!r} not one of {OUTCOMES}")


@dataclass
class RunResults:
    suite_version: str
    started: str  # ISO 8601, UTC
    finished: str | None = None
    environment: dict = field(default_factory=dict)  # kernel, tool and library versions
    cases: list[CaseResult] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION
    # name -> {"kind": kernel|userspace|vm, "version", "configuration"} of every implementation
    # the cases put in a role (conformance.implementations.describe)
    implementations: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def write_json(self, path: Path) -> None:
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        tmp.replace(path)

    @classmethod
    def from_dict(cls, data: dict, source: str = "results") -> RunResults:
        """Build from parsed JSON; unknown keys are ignored (newer writers), missing ones are errors."""
        if not isinstance(data, dict):
            raise InputError(f"{source}: expected a JSON object")
        if data.get("schema_version") not in READABLE:
            raise InputError(f"{source}: schema_version {data.get('schema_version')!r}, "
                             f"this tool reads {', '.join(map(str, READABLE))}")
        cases = []
        for i, c in enumerate(data.get("cases", [])):
            cases.append(_build(CaseResult, c, f"{source}: cases[{i}]"))
        rest = {k: v for k, v in data.items() if k != "cases"}
        return _build(cls, {**rest, "cases": cases}, source)

    @classmethod
    def read_json(cls, path: Path) -> RunResults:
        try:
            data = json.loads(Path(path).read_text())
        except OSError as exc:
            raise InputError(f"{path}: cannot read ({exc.strerror})") from None
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from None
        return cls.from_dict(data, str(path))

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(OUTCOMES, 0)
        for c in self.cases:
            out[c.outcome] += 1
        return out


def _build(cls, data: object, where: str):
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a JSON object")
    known = {f.name: f for f in fields(cls)}
    required = [n for n, f in known.items()
                if f.default is f.default_factory is MISSING]
    missing = [n for n in required if n not in data]
    if missing:
        raise InputError(f"{where}: missing field(s) {', '.join(missing)}")
    try:
        return cls(**{k: v for k, v in data.items() if k in known})
    except (TypeError, ValueError) as exc:
        raise InputError(f"{where}: {exc}") from None
