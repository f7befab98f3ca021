"""Loading and validating the requirement catalogue (rfc8684.yaml)."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from conformance.errors import InputError

DEFAULT_PATH = Path(__file__).with_name("rfc8684.yaml")
LEVELS = ("MUST", "MUST NOT", "REQUIRED", "SHALL", "SHALL NOT", "SHOULD", "SHOULD NOT", "RECOMMENDED",
          "NOT RECOMMENDED", "MAY", "OPTIONAL", "implicit")
ROLES = ("sender", "receiver", "both", "middlebox", "implementation")
TESTABILITY = ("wire-passive", "wire-active", "api", "not-testable")
_ID_RE = re.compile(r"^R([A-Z]|\d+)(\.\d+)*-L?\d{2}$")
_FIELDS = ("id", "section", "title", "level", "normative", "role", "testability", "summary", "check")


@dataclass(frozen=True)
class Requirement:
    id: str
    section: str
    title: str
    level: str
    normative: bool
    role: str
    testability: str
    summary: str
    check: str
    strength: str | None = None
    added: bool = False
    withdrawn: bool = False

    @property
    def required(self) -> bool:
        """MUST-class requirements fail a run; SHOULD/MAY ones are reported (see --strict)."""
        return self.level in ("MUST", "MUST NOT", "REQUIRED", "SHALL", "SHALL NOT")

    @property
    def url(self) -> str:
        return f"https://www.rfc-editor.org/rfc/rfc8684#section-{self.section}"


class Catalogue:
    def __init__(self, requirements: list[Requirement], source: Path):
        self.source = source
        self.by_id = {r.id: r for r in requirements}

    def __len__(self) -> int:
        return len(self.by_id)

    def __iter__(self):
        return iter(self.by_id.values())

    def __contains__(self, rid: str) -> bool:
        return rid in self.by_id

    def __getitem__(self, rid: str) -> Requirement:
        return self.by_id[rid]

    def sections(self) -> list[str]:
        return sorted({r.section for r in self}, key=_section_key)


def _section_key(section: str) -> tuple[int, ...]:
    # Numbered sections first, then appendices (A, B, ...), each in document order.
    return tuple(int(p) if p.isdigit() else 1000 + ord(p[0]) for p in section.split("."))


def parse_catalogue(text: str, source: Path) -> Catalogue:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise InputError(f"{source}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict) or not isinstance(data.get("requirements"), list):
        raise InputError(f"{source}: expected a mapping with a 'requirements' list")
    out, seen = [], set()
    for i, entry in enumerate(data["requirements"]):
        where = f"{source}: requirements[{i}]"
        if not isinstance(entry, dict):
            raise InputError(f"{where}: expected a mapping")
        missing = [f for f in _FIELDS if f not in entry]
        if missing:
            raise InputError(f"{where} ({entry.get('id', '?')}): missing field(s) {', '.join(missing)}")
        rid = entry["id"]
        if not isinstance(rid, str) or not _ID_RE.match(rid):
            raise InputError(f"{where}: id {rid!r} is not of the form R<section>-<nn>")
        if rid in seen:
            raise InputError(f"{where}: duplicate id {rid}")
        seen.add(rid)
        for key, allowed in (("level", LEVELS), ("role", ROLES), ("testability", TESTABILITY)):
            if entry[key] not in allowed:
                raise InputError(f"{where} ({rid}): {key} {entry[key]!r} not one of {', '.join(allowed)}")
        unknown = set(entry) - set(_FIELDS) - {"strength", "added", "withdrawn"}
        if unknown:
            raise InputError(f"{where} ({rid}): unknown field(s) {', '.join(sorted(unknown))}")
        out.append(Requirement(**{**entry, "section": str(entry["section"])}))
    return Catalogue(out, source)


@functools.cache
def load_catalogue(path: Path = DEFAULT_PATH) -> Catalogue:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(f"{path}: cannot read requirement catalogue ({exc.strerror})") from None
    return parse_catalogue(text, path)
