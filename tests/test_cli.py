"""The command line: argument errors, `report` on good and bad input."""

from __future__ import annotations

import json

import pytest

from conformance.cli import main
from conformance.report.model import CaseResult, RunResults


def test_unknown_subcommand_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bogus"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "invalid choice" in err


def test_extra_arguments_outside_run_are_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["doctor", "--bogus"])
    assert exc.value.code == 2
    assert "--bogus" in capsys.readouterr().err


def _results(outcome: str) -> RunResults:
    return RunResults(suite_version="0", started="t", cases=[
        CaseResult(id="cases/test_a.py::test_a", name="test_a", description="", requirements=["R3.1-11"],
                   outcome=outcome)])


@pytest.mark.parametrize("outcome, code", [("pass", 0), ("fail", 1), ("error", 1), ("oracle-disagreement", 3)])
def test_report_renders_again_and_exits_by_outcome(tmp_path, outcome, code):
    src = tmp_path / "results.json"
    _results(outcome).write_json(src)
    out = tmp_path / "again"
    assert main(["report", str(src), "--out", str(out)]) == code
    assert {p.name for p in out.iterdir()} == {"results.json", "report.md", "junit.xml", "report.html"}
    assert json.loads((out / "results.json").read_text())["cases"][0]["outcome"] == outcome


@pytest.mark.parametrize("text, words", [
    ("{", "not valid JSON"),
    ('{"schema_version": 99}', "schema_version 99"),
    ('{"schema_version": 2, "suite_version": "0", "started": "t", "cases": [{"id": "x"}]}',
     "cases[0]: missing field"),
])
def test_report_on_bad_results_is_one_error_and_writes_nothing(tmp_path, capsys, text, words):
    src = tmp_path / "results.json"
    src.write_text(text)
    out = tmp_path / "out"
    assert main(["report", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err and str(src) in err
    assert not out.exists() or not any(out.iterdir())


def _capture(tmp_path, defect: bool):
    from scapy.utils import wrpcap
    from test_observe_model import connection
    from test_observe_rules import DEFECTS

    path = tmp_path / ("bad.pcap" if defect else "good.pcap")
    wrpcap(str(path), DEFECTS["R3.1-15"]() if defect else connection())
    return path


def test_check_pcap_passes_a_correct_connection(tmp_path, capsys):
    assert main(["check-pcap", str(_capture(tmp_path, False))]) == 0
    out = capsys.readouterr().out
    assert "connection 0" in out and "0 failed" in out


def test_check_pcap_fails_on_a_must_violation_with_the_frame(tmp_path, capsys):
    assert main(["check-pcap", "--json", str(_capture(tmp_path, True))]) == 1
    data = json.loads(capsys.readouterr().out)
    failed = [j for j in data["judgments"] if j["outcome"] == "fail"]
    assert failed and failed[0]["requirement"] == "R3.1-15" and failed[0]["frames"][0].endswith("frame 1")


def test_check_pcap_only_and_bad_input(tmp_path, capsys):
    bad = _capture(tmp_path, True)
    assert main(["check-pcap", "--only", "R3.1-18", str(bad)]) == 0  # R3.1-15 filtered out
    assert main(["check-pcap", "--only", "R9-99", str(bad)]) == 2
    junk = tmp_path / "junk.pcap"
    junk.write_bytes(b"\x00" * 30)
    assert main(["check-pcap", str(junk)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any("junk.pcap" in line and "byte offset" in line for line in err)


def test_check_pcap_tshark_reports_disagreements_and_exits_by_them(tmp_path, capsys):
    import shutil

    if not shutil.which("tshark"):
        pytest.skip("tshark is not installed (mptcp-conformance doctor: tool:tshark)")
    good = _capture(tmp_path, False)
    assert main(["check-pcap", "--tshark", str(good)]) == 0
    assert "0 tshark disagreement(s)" in capsys.readouterr().out
    assert main(["check-pcap", "--tshark", "--json", str(good)]) == 0
    assert json.loads(capsys.readouterr().out)["tshark_disagreements"] == []


@pytest.mark.parametrize("content, words", [
    (b"\xd4\xc3\xb2\xa1\x02\x00\x04\x00" + bytes(8) + b"\x00\x00\x04\x00\x01\x00\x00\x00" + b"\x01\x02",
     "truncated record header"),
    (b"\x0a\x0d\x0d\x0a\x1c\x00\x00\x00\x4d\x3c\x2b\x1a", "truncated block"),
    (b"GIF89a not a capture", "neither pcap nor pcapng"),
    (b"\xd4\xc3\xb2\xa1\x02\x00\x04\x00" + bytes(8) + b"\x00\x00\x04\x00\x93\x00\x00\x00", "link type 147"),
])
def test_check_pcap_bad_files_are_one_line_naming_file_and_offset(tmp_path, capsys, content, words):
    path = tmp_path / "x.pcap"
    path.write_bytes(content)
    assert main(["check-pcap", str(path)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "x.pcap" in err[0] and "offset" in err[0] and words in err[0], err
    assert "Traceback" not in captured.err and captured.out == ""


@pytest.mark.parametrize(("argv", "words"), [
    (["guest", "six"], "kernel version 'six': expected a Debian kernel version"),
    (["guest", "6.1", "--accel", "xen"], "invalid choice: 'xen'"),
])
def test_guest_bad_input_is_one_line_and_exit_2(capsys, argv, words):
    with pytest.raises(SystemExit) as exc_info:
        code = main(argv)
        raise SystemExit(code)
    assert exc_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) <= 2 and words in err[-1], err
