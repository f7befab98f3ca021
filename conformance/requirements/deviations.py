"""Known deviations of implementations from RFC 8684 (deviations.yaml next to this file)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import yaml

from conformance.errors import InputError

DEVIATIONS = Path(__file__).with_name("deviations.yaml")


@cache
def known_deviations(path: Path = DEVIATIONS) -> dict[str, dict[str, str]]:
    """{implementation: {requirement ID: why}}; InputError naming the file and entry if malformed."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"{path}: cannot read known deviations: {exc}") from None
    if not isinstance(data, dict) or data.get("schema") != 1 or not isinstance(data.get("deviations"), dict):
        raise InputError(f"{path}: expected 'schema: 1' and a 'deviations' mapping")
    out: dict[str, dict[str, str]] = {}
    for impl, entries in data["deviations"].items():
        if not isinstance(entries, list):
            raise InputError(f"{path}: deviations.{impl}: expected a list")
        for n, e in enumerate(entries):
            if not isinstance(e, dict) or not isinstance(e.get("id"), str) or not isinstance(e.get("why"), str):
                raise InputError(f"{path}: deviations.{impl}[{n}]: expected 'id' and 'why' strings")
            out.setdefault(impl, {})[e["id"]] = e["why"]
    return out
