"""matrix.html: the interop matrix as one self-contained static page (jinja2).

Rows are clients, columns servers; each cell holds one badge per scenario, coloured and
abbreviated by the worst outcome of its cases and linking to the artefact folder of the case
that outcome comes from, with the pair's full compliance report one more link away."""

from __future__ import annotations

import jinja2

from conformance.matrix import ABBREVIATION, SEVERITY

_TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("conformance.report", "templates"),
                                autoescape=True, trim_blocks=True, lstrip_blocks=True,
                                undefined=jinja2.StrictUndefined)


def render_matrix(data: dict) -> str:
    """The page for matrix.json's `data` (conformance.matrix.aggregate)."""
    by_pair = {(p["client"], p["server"]): p for p in data["pairs"]}
    return _TEMPLATES.get_template("matrix.html.j2").render(
        data=data, by_pair=by_pair, abbreviation=ABBREVIATION, legend=[*SEVERITY, "not-run"])
