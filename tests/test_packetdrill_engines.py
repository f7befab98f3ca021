"""The engines on the live kernel: strict against rfc, what a failure says, the CLI's errors,
and nothing left behind. The corpus itself runs as conformance cases (cases/packetdrill)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conformance.cli import main
from conformance.net.names import our_netns, run_prefix
from conformance.packetdrill import engines
from conformance.packetdrill.script import load

CORPUS = Path(__file__).resolve().parents[1] / "cases" / "packetdrill"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a namespace and a TUN device per run)")

LISTEN = """--tolerance_usecs=100000
`../common/defaults.sh`

+0    `../common/signal.sh`
+0    socket(..., SOCK_STREAM, IPPROTO_MPTCP) = 3
+0    setsockopt(3, SOL_SOCKET, SO_REUSEADDR, [1], 4) = 0
+0    bind(3, ..., ...) = 0
+0    listen(3, 1) = 0
+0    < S  0:0(0) win 65535 <mss 1460, sackOK, TS val 100 ecr 0, nop, wscale 8, mpcapable v1 flags[flag_h] nokey>
+0    > S. 0:0(0) ack 1 <mss 1460, sackOK, TS val 200 ecr 100, nop, wscale 9, mpcapable v1 flags[flag_h] key[skey]>
+0    < .  1:1(0) ack 1 win 256 <nop, nop, TS val 101 ecr 200, mpcapable v1 flags[flag_h] key[ckey=2, skey]>
+0    accept(3, ..., ...) = 4
"""


def _script(tmp_path: Path, body: str, name: str = "t_v4.pkt") -> Path:
    (tmp_path / "common").mkdir(exist_ok=True)
    for helper in (CORPUS / "common").iterdir():
        shutil.copy(helper, tmp_path / "common" / helper.name)
    folder = tmp_path / "case"
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(body)
    return path


@needs_root
def test_rfc_mode_tolerates_what_the_rfc_allows_and_strict_does_not(tmp_path: Path) -> None:
    # Written for kernels that put a Data ACK beside their ADD_ADDR: 6.18 sends the ADD_ADDR alone.
    path = _script(tmp_path, LISTEN + """
+0 > . 1:1(0) ack 1 <nop, nop, TS val 201 ecr 101, add_address address_id=1 addr[s1] hmac=auto, dss dack4=1 nocs>
""")
    strict = engines.run(load(path), "ipv4", "python", "strict")
    assert strict.verdict == "fail" and strict.kind == "mismatch" and strict.line == 14, strict.details()
    assert "options: expected <nop, nop, TS, mptcp, mptcp>, got <nop, nop, TS, mptcp>" in strict.message
    assert "addr[s1] hmac=auto, dss dack4=1 nocs>" in strict.expected  # the script's line
    assert strict.seen.startswith("> 192.168.0.2:8080 > 192.0.2.1:") and "add_address address_id=1" in strict.seen
    rfc = engines.run(load(path), "ipv4", "python", "rfc")
    assert rfc.verdict == "pass", rfc.details()
    assert any("DSS carrying only a Data ACK is not on" in t for t in rfc.tolerated), rfc.tolerated


@needs_root
def test_rfc_mode_still_fails_what_the_rfc_requires(tmp_path: Path) -> None:
    # The kernel's ADD_ADDR HMAC must verify: a script expecting another one fails in both modes.
    path = _script(tmp_path, LISTEN + """
+0    > .  1:1(0) ack 1 <nop, nop, TS val 201 ecr 101, add_address address_id=1 addr[s1] hmac=1234>
""")
    for mode in ("strict", "rfc"):
        r = engines.run(load(path), "ipv4", "python", mode)
        assert r.verdict == "fail" and "hmac: expected" in r.message, r.details()


@needs_root
def test_a_timeout_lists_the_last_packets_and_a_syscall_mismatch_says_both_results(tmp_path: Path) -> None:
    quiet = LISTEN.replace("+0    `../common/signal.sh`\n", "")
    path = _script(tmp_path, quiet + """
+0    > P. 1:11(10) ack 1 <nop, nop, TS val 201 ecr 101, dss dack8=1 dsn8=1 ssn=1 dll=10 nocs, nop, nop>
""", "never.pkt")
    r = engines.run(load(path), "ipv6", "python", "strict")
    assert r.verdict == "fail" and r.kind == "timeout" and r.line == 13, r.details()
    assert any("mpcapable v1 flags 0x1 key[0x2," in p for p in r.recent), r.recent
    assert "last packets seen:" in r.details()
    path = _script(tmp_path, LISTEN.replace("listen(3, 1) = 0", "listen(3, 1) = -1 EINVAL"), "sys.pkt")
    r = engines.run(load(path), "ipv4", "python", "strict")
    assert r.verdict == "fail" and r.kind == "syscall" and r.line == 8, r.details()
    assert r.message == "listen() returned 0, expected -1 EINVAL"


@needs_root
def test_runs_leave_no_namespace_behind(tmp_path: Path) -> None:
    path = _script(tmp_path, LISTEN)
    before = set(our_netns())
    r = engines.run(load(path), "ipv4", "python", "strict")
    assert r.verdict == "pass", r.details()
    assert {n for n in our_netns() if n.startswith(run_prefix())} <= before


def test_the_packetdrill_engine_skips_with_the_reason_when_no_usable_binary(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PACKETDRILL", str(tmp_path / "no-such-packetdrill"))
    monkeypatch.setattr("shutil.which", lambda name: None)
    engines.packetdrill_binary.cache_clear()
    try:
        r = engines.run(load(CORPUS / "mp_capable" / "server_handshake_and_data.pkt"), "ipv4", "packetdrill")
        assert r.verdict == "skip" and "not executable" in r.message
        assert engines.resolve_engine("auto") == "python"
    finally:
        engines.packetdrill_binary.cache_clear()


def test_a_script_for_the_python_engine_only_is_skipped_by_the_other_with_why() -> None:
    r = engines.run(load(CORPUS / "add_address" / "client_echoes_and_joins.pkt"), "ipv4", "packetdrill")
    assert r.verdict == "skip" and "never ties a subflow the kernel opens to a socket" in r.message


def test_cli_refuses_a_malformed_script_with_one_line_and_runs_nothing(tmp_path: Path, capsys) -> None:
    good = _script(tmp_path, LISTEN, "good.pkt")
    bad = _script(tmp_path, LISTEN + "+0 < S 0:0(0) win 1 <mss 1460, nop>\n", "bad.pkt")
    assert main(["pkt", str(good), str(bad), "--engine", "python"]) == 2
    out = capsys.readouterr()
    assert out.err.strip() == f"mptcp-conformance pkt: {bad}:13:1: TCP options are not padded to a multiple " \
                              "of 4 bytes (5 bytes: add 3 nop)"
    assert out.out == ""  # nothing ran, the good script included
    assert main(["pkt", str(tmp_path / "missing.pkt")]) == 2
    assert "missing.pkt:1:1: cannot read the script" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["pkt", str(good), "--mode", "bytes"])
    assert exc.value.code == 2


@needs_root
def test_cli_runs_every_variant_and_says_how_many(tmp_path: Path, capsys) -> None:
    path = _script(tmp_path, LISTEN, "all.pkt")
    assert main(["pkt", str(path), "--engine", "python"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split("[")[1].split(",")[0] for line in out[:3]] == ["ipv4", "ipv4-mapped-ipv6", "ipv6"]
    assert out[-1] == "3 run(s): 3 pass"
