"""report.html: verdicts per requirement with evidence, frame cards two clicks from a failure,
filters that work offline, and the page as headless Chromium renders it."""

from __future__ import annotations

import base64
import re
import struct
from html.parser import HTMLParser
from pathlib import Path

from headless import chromium, headless
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

from conformance.report import writers
from conformance.report.html import render_html
from conformance.report.model import CaseResult, RunResults
from conformance.requirements import load_catalogue
from conformance.wire import MPCapable

CAT = load_catalogue()
FAILED, PASSED, DEVIATES, SKIPPED = "R3.1-06", "R3.1-01", "R3.9.1-01", "R3.1-03"


class _Page(HTMLParser):
    """Elements by id, links by target, and the rows of the requirements table."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.ids: dict[str, dict] = {}
        self.hrefs: list[str] = []
        self.rows: dict[str, dict] = {}
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if "id" in a:
            self.ids[a["id"]] = {"tag": tag, **a}
        if tag == "a" and "href" in a:
            self.hrefs.append(a["href"])
        if tag == "tr" and "req" in a.get("class", "").split():
            self.rows[a["id"].removeprefix("req-")] = a


def _capture(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    syn = Ether() / IP(src="198.18.1.2", dst="198.19.0.2") / TCP(sport=40000, dport=5201, flags="S",
                                                                options=[MPCapable(flags="H")])
    synack = Ether() / IP(src="198.19.0.2", dst="198.18.1.2") / TCP(sport=5201, dport=40000, flags="SA",
                                                                   options=[MPCapable(flags="H", sender_key=7)])
    data = [Ether() / IP(src="198.18.1.2", dst="198.19.0.2") / TCP(sport=40000, dport=5201, flags="A",
                                                                   seq=1 + 100 * i) / (b"x" * 100)
            for i in range(3)]
    for i, pkt in enumerate([syn, synack, *data]):
        pkt.time = 1000.0 + i / 100
    path = folder / "c1-eth0.pcap"
    wrpcap(str(path), [syn, synack, *data])
    return path


def _results(report: Path) -> RunResults:
    _capture(report / "artefacts" / "fail-case")
    return RunResults(suite_version="0.1.0", started="2026-01-02T03:04:05+00:00",
                      finished="2026-01-02T03:05:05+00:00", environment={"kernel": "6.18"}, cases=[
        CaseResult(id="cases/test_a.py::test_fails", name="test_fails", description="fails",
                   requirements=[FAILED], outcome="fail", reason="1 of 2 checks failed: <tcpdump> & co",
                   artefacts="artefacts/fail-case",
                   checks=[{"requirement": FAILED, "ok": False,
                            "text": f"[{FAILED}] keys differ: seen c1-eth0.pcap frame 2: the SYN/ACK's key"},
                           {"requirement": None, "ok": True, "text": "the SYN is c1-eth0.pcap frame 1"}]),
        CaseResult(id="cases/test_a.py::test_passes", name="test_passes", description="passes",
                   requirements=[PASSED, DEVIATES], outcome="pass", artefacts="artefacts/missing",
                   checks=[{"requirement": PASSED, "ok": True,
                            "text": f"[{PASSED}] version 1: s1-eth0.pcap frame 9"},
                           {"requirement": DEVIATES, "ok": False, "deviation": "linux: ephemeral ports",
                            "text": f"[{DEVIATES}] join port"}]),
        CaseResult(id="cases/test_a.py::test_skips", name="test_skips", description="skips",
                   requirements=[SKIPPED], outcome="skip", reason="no second path"),
        CaseResult(id="cases/test_a.py::test_errors", name="test_errors", description="errors",
                   requirements=[], outcome="error", reason="harness broke"),
    ])


def test_every_verdict_and_outcome_is_shown_and_text_is_escaped(tmp_path: Path) -> None:
    text = render_html(_results(tmp_path), CAT, tmp_path)
    page = _Page(text)
    verdicts = {rid: row["data-verdict"] for rid, row in page.rows.items()}
    assert (verdicts[FAILED], verdicts[PASSED], verdicts[DEVIATES], verdicts[SKIPPED]) == (
        "fail", "pass", "deviation", "skip")
    assert sum(v == "not-covered" for v in verdicts.values()) == len(CAT.by_id) - 4
    assert page.rows[FAILED]["data-level"] == "MUST" and page.rows[FAILED]["data-section"] == CAT[FAILED].section
    for outcome in ("pass", "fail", "skip", "error"):
        assert f'class="badge o-{outcome}"' in text
    assert "<tcpdump>" not in text and "&lt;tcpdump&gt; &amp; co" in text
    assert page.ids["required-failed"]["class"] == "banner bad" and f'href="#req-{FAILED}"' in text


def test_a_failed_requirement_is_two_clicks_from_its_frame(tmp_path: Path) -> None:
    text = render_html(_results(tmp_path), CAT, tmp_path)
    page = _Page(text)
    row = text[text.index(f'id="req-{FAILED}"'):]
    row = row[:row.index("</tr>")]
    # Click 1 opens the row's evidence (<details>); click 2 follows the frame link to its card.
    anchor = re.search(r'<a class="frame" href="#(f\d+)">c1-eth0.pcap frame 2</a>', row).group(1)
    card = text[text.index(f'id="{anchor}"'):]
    card = card[:card.index("</div>")]
    assert "c1-eth0.pcap frame 2" in card and "[SA]" in card and "MP_CAPABLE" in card
    assert 'href="artefacts/fail-case/c1-eth0.pcap"' in card and "frame.number==2" in card
    assert "artefacts/fail-case/c1-eth0.pcap" in page.hrefs
    # A capture the artefacts lack still gets a card, saying so, without a dead link.
    missing = re.search(r'<a class="frame" href="#(f\d+)">s1-eth0.pcap frame 9</a>', text).group(1)
    card = text[text.index(f'id="{missing}"'):]
    assert "not in the artefacts" in card[:card.index("</div>")]
    assert "artefacts/missing/s1-eth0.pcap" not in page.hrefs


def test_each_case_with_client_captures_gets_its_sequence_plot(tmp_path: Path) -> None:
    text = render_html(_results(tmp_path), CAT, tmp_path)
    blocks = {m.group(1): m.group(2) for m in re.finditer(
        r'<div class="case" id="(case-\d+)">(.*?)(?=<div class="case"|<script>)', text, re.S)}
    with_plot = [anchor for anchor, block in blocks.items() if 'class="plot"' in block]
    assert with_plot == ["case-1"]  # only the failing case has captures in its artefacts
    uri = re.search(r'<img class="plot" alt="[^"]*" src="data:image/png;base64,([^"]+)"', text).group(1)
    assert base64.b64decode(uri)[:8] == b"\x89PNG\r\n\x1a\n"
    assert 'class="plot"' not in render_html(_results(tmp_path), CAT, tmp_path, plots=False)


def test_write_all_writes_the_page_with_the_other_files(tmp_path: Path) -> None:
    results = _results(tmp_path)
    out = writers.write_all(results, CAT, tmp_path)
    assert out["html"] == tmp_path / "report.html"
    assert _Page(out["html"].read_text()).rows[FAILED]["data-verdict"] == "fail"


def test_the_page_renders_in_headless_chromium_with_its_filters_applied(tmp_path: Path) -> None:
    binary = chromium()
    out = writers.write_all(_results(tmp_path), CAT, tmp_path)
    url = out["html"].resolve().as_uri()
    dom = headless(binary, tmp_path / "profile", "--virtual-time-budget=3000", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-800:]
    page = _Page(dom.stdout)
    # The script ran: it counted the rows it shows (not-covered ones start hidden).
    shown = re.search(r'id="f-count">(\d+) of (\d+) requirements<', dom.stdout)
    assert shown is not None, "the filter script did not run"
    assert (int(shown.group(1)), int(shown.group(2))) == (4, len(CAT.by_id))
    assert "hidden" in page.rows["R3.1-02"].get("class", "") and "hidden" not in page.rows[FAILED]["class"]
    shot = tmp_path / "report.png"
    done = headless(binary, tmp_path / "profile", "--window-size=1280,1600", f"--screenshot={shot}", url)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-800:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1280, 1600)
    assert len(data) > 20_000, "the screenshot is (nearly) blank"
