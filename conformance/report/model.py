"""The results model: the one schema every report, matrix and CI view is rendered from.

Documented in docs/results.md. Bump SCHEMA_VERSION on any incompatible change."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

SCHEMA_VERSION = 1
OUTCOMES = ("pass", "fail", "skip", "error")


@dataclass
class CaseResult:
    id: str  # pytest node id, stable across runs
    name: str  # short name (the test function)
    description: str  # first line of the case's docstring
    requirements: list[str]  # RFC 8684 requirement IDs the case proves
    outcome: str  # pass | fail | skip | error
    reason: str | None = None  # why it failed, skipped or errored
    duration_s: float = 0.0
    artefacts: str | None = None  # folder with pcaps, endpoint reports, counters, logs
    topology: str | None = None
    family: str | None = None
    implementations: dict[str, str] = field(default_factory=dict)  # role -> implementation name
    evidence: list[str] = field(default_factory=list)  # sentences on what was seen on the wire

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

    def to_dict(self) -> dict:
        return asdict(self)

    def write_json(self, path: Path) -> None:
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        tmp.replace(path)

    @classmethod
    def from_dict(cls, data: dict) -> RunResults:
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"results schema_version {data.get('schema_version')!r}, "
                             f"this tool reads {SCHEMA_VERSION}")
        cases = [CaseResult(**c) for c in data.get("cases", [])]
        rest = {k: v for k, v in data.items() if k != "cases"}
        return cls(**rest, cases=cases)

    @classmethod
    def read_json(cls, path: Path) -> RunResults:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(OUTCOMES, 0)
        for c in self.cases:
            out[c.outcome] += 1
        return out
