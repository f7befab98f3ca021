"""The requirement catalogue: the shipped file, and the errors of a malformed one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from conformance.errors import InputError
from conformance.requirements.catalogue import (
    DEFAULT_PATH,
    LEVELS,
    ROLES,
    TESTABILITY,
    load_catalogue,
    parse_catalogue,
)

SOURCE = Path("/somewhere/catalogue.yaml")
REQUIRED_LEVELS = {"MUST", "MUST NOT", "REQUIRED", "SHALL", "SHALL NOT"}


def _entry(rid: str = "R3.1-01", **over) -> dict:
    entry = {"id": rid, "section": "3.1", "title": "Connection Initiation", "level": "MUST",
             "normative": True, "role": "sender", "testability": "wire-passive",
             "summary": "some summary", "check": "some check"}
    entry.update(over)
    return entry


def _text(*entries: dict) -> str:
    return yaml.safe_dump({"schema": 1, "rfc": 8684, "requirements": list(entries)}, sort_keys=False)


# --- the shipped catalogue ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def shipped():
    return load_catalogue()


def test_shipped_catalogue_loads(shipped):
    assert shipped.source == DEFAULT_PATH
    assert len(shipped) >= 192
    raw = yaml.safe_load(DEFAULT_PATH.read_text())["requirements"]
    assert len({e["id"] for e in raw}) == len(raw) == len(shipped)  # unique IDs, none dropped


def test_shipped_entries_are_valid(shipped):
    for r in shipped:
        assert r.level in LEVELS, r.id
        assert r.role in ROLES, r.id
        assert r.testability in TESTABILITY, r.id
        assert isinstance(r.normative, bool), r.id
        assert r.title.strip() and r.summary.strip() and r.check.strip(), r.id
        assert r.required == (r.level in REQUIRED_LEVELS), r.id
        assert r.url == f"https://www.rfc-editor.org/rfc/rfc8684#section-{r.section}"


def test_shipped_entries_follow_the_schema_comments(shipped):
    """The conventions the file header states: IDs carry their section, LNN entries are the
    non-BCP 14 ones, `implicit` exactly when not normative, `strength` only there."""
    for r in shipped:
        m = re.fullmatch(r"R(.+)-(L?)(\d{2})", r.id)
        assert m, r.id
        assert m.group(1) == r.section, r.id
        assert (m.group(2) == "L") == (not r.normative), r.id
        assert (r.level == "implicit") == (not r.normative), r.id
        if r.strength is not None:
            assert not r.normative and r.strength in ("must", "must not", "should"), r.id


def test_shipped_sections_in_document_order(shipped):
    sections = shipped.sections()
    assert sections[0] == "3"
    numbered = [s for s in sections if s[0].isdigit()]
    assert sections[:len(numbered)] == numbered  # appendices after every numbered section
    assert numbered == sorted(numbered, key=lambda s: [int(p) for p in s.split(".")])
    assert len(sections) == len(set(sections))


def test_shipped_catalogue_has_every_kind(shipped):
    assert {r.role for r in shipped} >= {"sender", "receiver"}
    assert {r.testability for r in shipped} >= {"wire-passive", "wire-active"}
    assert any(r.required for r in shipped) and any(not r.required for r in shipped)
    assert "R3-01" in shipped and shipped["R3-01"].id == "R3-01"


# --- parse errors ------------------------------------------------------------------------------

def test_parse_minimal_catalogue():
    cat = parse_catalogue(_text(_entry(), _entry("R3.1-L01", level="implicit", normative=False,
                                                   strength="should")), SOURCE)
    assert [r.id for r in cat] == ["R3.1-01", "R3.1-L01"]
    assert cat["R3.1-L01"].strength == "should"
    assert cat.source == SOURCE


def test_invalid_yaml_names_file_and_line():
    lines = _text(_entry(), _entry("R3.1-02")).splitlines()
    bad_line = max(i for i, line in enumerate(lines) if line.lstrip().startswith("title:")) + 1
    lines[bad_line - 1] = lines[bad_line - 1].replace("title: ", "title: [unclosed ")
    with pytest.raises(InputError) as exc:
        parse_catalogue("\n".join(lines) + "\n", SOURCE)
    msg = str(exc.value)
    m = re.match(rf"{re.escape(str(SOURCE))}:(\d+):(\d+): not valid YAML", msg)
    assert m, msg
    assert bad_line <= int(m.group(1)) <= bad_line + 1, msg  # the parser notices at most a line later


def test_invalid_yaml_tab_indent_names_file_and_line():
    text = "requirements:\n  - id: R3-01\n\tsection: '3'\n"
    with pytest.raises(InputError, match=rf"^{re.escape(str(SOURCE))}:3:\d+: not valid YAML"):
        parse_catalogue(text, SOURCE)


@pytest.mark.parametrize("text", ["", "- just\n- a list\n", "requirements: 3\n", "schema: 1\n"])
def test_wrong_shape_names_the_file(text):
    with pytest.raises(InputError, match=rf"^{re.escape(str(SOURCE))}: expected a mapping with a "
                                         r"'requirements' list"):
        parse_catalogue(text, SOURCE)


def test_entry_not_a_mapping():
    with pytest.raises(InputError, match=rf"^{re.escape(str(SOURCE))}: requirements\[1\]: "
                                         r"expected a mapping"):
        parse_catalogue(_text(_entry(), "R3.1-02"), SOURCE)


def test_missing_field_names_file_entry_and_field():
    broken = _entry("R3.1-02")
    del broken["testability"], broken["check"]
    with pytest.raises(InputError) as exc:
        parse_catalogue(_text(_entry(), broken), SOURCE)
    msg = str(exc.value)
    assert msg.startswith(f"{SOURCE}: requirements[1] (R3.1-02): missing field(s)"), msg
    assert "testability" in msg and "check" in msg


def test_missing_id_names_the_entry_position():
    broken = _entry()
    del broken["id"]
    with pytest.raises(InputError, match=rf"^{re.escape(str(SOURCE))}: requirements\[0\] \(\?\): "
                                         r"missing field\(s\) id"):
        parse_catalogue(_text(broken), SOURCE)


def test_duplicate_id():
    with pytest.raises(InputError, match=rf"^{re.escape(str(SOURCE))}: requirements\[2\]: "
                                         r"duplicate id R3.1-01$"):
        parse_catalogue(_text(_entry(), _entry("R3.1-02"), _entry()), SOURCE)


@pytest.mark.parametrize("rid", ["3.1-01", "R3.1-1", "R3.1-001", "r3.1-01", "R3.1_01", "R3.1-X01",
                                 "R-01", "R3.1-01 ", 301])
def test_bad_id_format(rid):
    with pytest.raises(InputError) as exc:
        parse_catalogue(_text(_entry(), _entry(rid)), SOURCE)
    msg = str(exc.value)
    assert msg.startswith(f"{SOURCE}: requirements[1]: id {rid!r} is not of the form R<section>-<nn>"), msg


@pytest.mark.parametrize("rid", ["R3-01", "R3.3.1-12", "RB.2-01", "RC.1.1-L03", "R3.1-L01"])
def test_good_id_formats(rid):
    assert rid in parse_catalogue(_text(_entry(rid)), SOURCE)


@pytest.mark.parametrize(("field", "value"), [
    ("level", "MUSTN'T"), ("level", "must"), ("role", "client"), ("testability", "manual"),
])
def test_bad_enumerated_value(field, value):
    with pytest.raises(InputError) as exc:
        parse_catalogue(_text(_entry(), _entry("R3.1-02", **{field: value})), SOURCE)
    msg = str(exc.value)
    assert msg.startswith(f"{SOURCE}: requirements[1] (R3.1-02): {field} {value!r} not one of "), msg


def test_unknown_field():
    with pytest.raises(InputError, match=r"requirements\[0\] \(R3.1-01\): unknown field\(s\) colour"):
        parse_catalogue(_text(_entry(colour="blue")), SOURCE)


def test_unreadable_file_names_it(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(InputError, match=rf"^{re.escape(str(missing))}: cannot read requirement catalogue"):
        load_catalogue(missing)
