"""The interop matrix (conformance.matrix, `mptcp-conformance matrix`): its declaration, bad
input, the aggregate of recorded pair results with every outcome kind, the page as headless
Chromium renders it, and the GitHub Actions workflow that shards it."""

from __future__ import annotations

import json
import re
import struct
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from headless import chromium, headless

from conformance.cli import main
from conformance.errors import InputError
from conformance.matrix import DEFAULT_PATH, aggregate, load_matrix
from conformance.report.model import OUTCOMES, CaseResult, RunResults

ROOT = Path(__file__).resolve().parents[1]


def test_the_shipped_matrix_declares_the_path_managers_and_guest_kernels_in_both_roles() -> None:
    m = load_matrix()
    players = ["linux", "linux-userspace-pm", "linux-6.1-kvm", "linux-6.12-kvm"]
    assert m.players("client") == m.players("server") == players
    assert len(m.pairs(None, None)) == 16
    assert m.pairs("linux", "linux-userspace-pm") == [("linux", "linux-userspace-pm")]
    assert [s.name for s in m.select("join,add-*")] == ["join", "add-addr"]
    for scenario in m.scenarios.values():
        for case in scenario.cases:
            assert (ROOT / "cases" / case.split("::")[0]).is_file()


BAD = [
    ("schema: 1\nimplementations: {linux: {roles: [client]}\n", r"matrix.yaml:\d+:\d+: not valid YAML"),
    ("schema: 2\n", r"schema: 2, this tool reads 1"),
    ("schema: 1\nimplementations: {bsd: {}}\nscenarios: {a: {cases: [test_s3_2_mp_join.py]}}\n",
     r"implementations.bsd: unknown implementation 'bsd'"),
    ("schema: 1\nimplementations: {linux: {roles: [middle]}}\nscenarios: {a: {cases: [test_s3_2_mp_join.py]}}\n",
     r"implementations.linux.roles: expected a list of client and server"),
    ("schema: 1\nimplementations: {linux: }\nscenarios: {a: {cases: [test_s3_2_mp_join.py, nope.py]}}\n",
     r"scenarios.a.cases\[1\]: nope.py is not a file under"),
    ("schema: 1\nimplementations: {linux: }\nfamilies: [ipv5]\nscenarios: {a: {cases: [x.py]}}\n",
     r"families: expected a list of"),
    ("schema: 1\nimplementations: {linux: }\nscenarios: {a: {cases: [test_s3_2_mp_join.py]}}\nextra: 1\n",
     r"unknown key\(s\) extra"),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_a_bad_matrix_file_is_named_with_the_place(tmp_path: Path, text: str, message: str, capsys) -> None:
    path = tmp_path / "matrix.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        load_matrix(path)
    out = tmp_path / "out"
    assert main(["matrix", "--file", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err
    assert not out.exists()  # nothing half-written


def test_bad_arguments_exit_2_with_one_line(capsys) -> None:
    for argv, text in ((["--client", "bsd"], "--client 'bsd': not an implementation"),
                       (["--cases", "nothing*"], "--cases 'nothing*': matches no scenario")):
        assert main(["matrix", "--list-pairs", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and text in err


def _pair(folder: Path, client: str, server: str, outcomes: dict[str, str]) -> Path:
    """A recorded pair: one case per (file, outcome)."""
    cases = [CaseResult(id=f"cases/{file}::test_x[ipv4]", name="test_x", description="x", requirements=["R3.1-06"],
                        outcome=outcome, reason=None if outcome == "pass" else f"why {outcome}",
                        artefacts=f"artefacts/{file}-{outcome}",
                        implementations={"client": client, "server": server})
             for file, outcome in outcomes.items()]
    pair = folder / f"{client}--{server}"
    pair.mkdir(parents=True)
    RunResults(suite_version="0", started="t", cases=cases).write_json(pair / "results.json")
    return pair


def _recorded(tmp_path: Path) -> tuple[list[Path], dict]:
    m = load_matrix()
    scenarios = m.select("handshake,join,checksum,middleboxes")
    out = tmp_path / "matrix"
    pairs = [
        _pair(out, "linux", "linux", {"test_s3_1_mp_capable.py": "pass", "test_s3_2_mp_join.py": "fail",
                                      "test_s3_7_checksum_failure.py": "oracle-disagreement"}),
        _pair(out, "linux", "linux-userspace-pm", {"test_s3_1_mp_capable.py": "skip",
                                                   "test_s3_2_mp_join.py": "unsupported",
                                                   "test_s3_7_checksum_failure.py": "error"}),
    ]
    return pairs, aggregate(m, scenarios, pairs, out)


def test_each_cell_shows_its_worst_outcome_and_links_to_that_cases_artefacts(tmp_path: Path) -> None:
    _, data = _recorded(tmp_path)
    assert data["clients"] == ["linux"] and data["servers"] == ["linux", "linux-userspace-pm"]
    cells = {(p["server"], c["scenario"]): c for p in data["pairs"] for c in p["cells"]}
    seen = {key: c["outcome"] for key, c in cells.items()}
    assert seen == {("linux", "handshake"): "pass", ("linux", "join"): "fail",
                    ("linux", "checksum"): "oracle-disagreement", ("linux", "middleboxes"): "not-run",
                    ("linux-userspace-pm", "handshake"): "skip", ("linux-userspace-pm", "join"): "unsupported",
                    ("linux-userspace-pm", "checksum"): "error", ("linux-userspace-pm", "middleboxes"): "not-run"}
    assert cells[("linux", "join")]["href"] == "linux--linux/artefacts/test_s3_2_mp_join.py-fail"
    assert cells[("linux-userspace-pm", "join")]["reason"] == "why unsupported"
    assert json.loads((tmp_path / "matrix" / "matrix.json").read_text()) == data
    page = (tmp_path / "matrix" / "matrix.html").read_text()
    for outcome in set(OUTCOMES) | {"not-run"}:
        assert f'class="o-{outcome}"' in page, outcome
    assert 'href="linux--linux-userspace-pm/report.html"' in page


def test_merge_builds_the_matrix_from_pair_folders_made_elsewhere(tmp_path: Path, capsys) -> None:
    pairs, _ = _recorded(tmp_path)
    out = tmp_path / "merged"
    rc = main(["matrix", "--cases", "handshake,join,checksum,middleboxes", "--merge", *map(str, pairs),
               "--out", str(out)])
    assert rc == 1  # linux--linux failed a MUST (R3.1-06): the worst pair decides
    assert (out / "matrix.html").is_file() and "interop matrix" in capsys.readouterr().out
    assert main(["matrix", "--merge", str(tmp_path / "nothing--here"), "--out", str(out)]) == 2


class _Cells(HTMLParser):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.cells: list[dict] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "td" and "cell" in a.get("class", "").split() and "data-client" in a:
            self.cells.append(a)


def test_the_matrix_page_renders_in_headless_chromium(tmp_path: Path) -> None:
    binary = chromium()
    _recorded(tmp_path)
    url = (tmp_path / "matrix" / "matrix.html").resolve().as_uri()
    dom = headless(binary, tmp_path / "profile", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-800:]
    cells = _Cells(dom.stdout).cells
    assert [(c["data-client"], c["data-server"]) for c in cells] == [("linux", "linux"),
                                                                     ("linux", "linux-userspace-pm")]
    assert len(re.findall(r'class="o-unsupported" href=', dom.stdout)) == 1
    shot = tmp_path / "matrix.png"
    done = headless(binary, tmp_path / "profile", "--window-size=1000,700", f"--screenshot={shot}", url)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-800:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24]) == (1000, 700)
    assert len(data) > 10_000, "the screenshot is (nearly) blank"


def test_the_workflow_shards_the_pairs_and_merges_them(capsys) -> None:
    flow = yaml.safe_load((ROOT / "ci" / "github" / "matrix.yml").read_text())
    jobs = flow["jobs"]
    assert "bash .ci/run" in jobs["tests"]["steps"][-1]["run"]
    assert jobs["pair"]["needs"] == "pairs"
    assert jobs["pair"]["strategy"]["matrix"]["include"] == "${{ fromJSON(needs.pairs.outputs.pairs) }}"
    assert jobs["merge"]["needs"] == "pair" and jobs["merge"]["if"] == "always()"
    runs = " ".join(s.get("run", "") for job in jobs.values() for s in job["steps"])
    assert "matrix --list-pairs" in runs and "--merge" in runs
    # What the pairs job hands to the shards is what the matrix file declares.
    assert main(["matrix", "--list-pairs", "--file", str(DEFAULT_PATH)]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {(p["client"], p["server"]) for p in listed} == set(load_matrix().pairs(None, None))
