"""The doctor: pure parts (no root needed) and the real facts of this machine (root)."""

from __future__ import annotations

import io
import json
import os
import subprocess

import pytest
from rich.console import Console

from conformance import doctor
from conformance.doctor import Probe
from conformance.errors import CapabilityMissing
from conformance.net.names import run_prefix

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, tc, iptables)")


def _probe(name: str, ok: bool, reason: str = "") -> Probe:
    return Probe(name, ok, "some detail", "" if ok else reason, "some feature")


def _all_essential_ok() -> list[Probe]:
    return [_probe(n, True) for n in doctor.ESSENTIAL]


def _our_netns() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines()
            if line.strip() and line.split()[0].startswith(run_prefix() + "-")]


# --- pure parts --------------------------------------------------------------------------------

def test_crashing_probe_becomes_failed_probe(monkeypatch):
    def boom() -> Probe:
        raise RuntimeError("kaboom 42")

    monkeypatch.setattr(doctor, "_PROBES", [("fine", lambda: _probe("fine", True)), ("boom", boom)])
    probes = doctor.run_all()
    assert [p.name for p in probes] == ["fine", "boom"]
    assert probes[0].ok
    assert not probes[1].ok
    assert "kaboom 42" in probes[1].reason and "RuntimeError" in probes[1].reason


def test_crash_inside_probe_body_is_contained():
    def body() -> Probe:
        raise OSError(5, "I/O error")

    p = doctor._attempt("x", "y", body)
    assert (p.name, p.ok, p.needed_for) == ("x", False, "y")
    assert "I/O error" in p.reason


def test_list_probe_kept_flat(monkeypatch):
    monkeypatch.setattr(doctor, "_PROBES", [("many", lambda: [_probe("a", True), _probe("b", False, "r")])])
    assert [p.name for p in doctor.run_all()] == ["a", "b"]


def test_require_names_every_missing_capability(monkeypatch):
    fake = {
        "qdisc:netem": _probe("qdisc:netem", False, "netem is missing"),
        "dev:kvm": _probe("dev:kvm", False, "kvm is missing"),
        "qdisc:htb": _probe("qdisc:htb", True),
    }
    monkeypatch.setattr(doctor, "probe", fake.__getitem__)
    with pytest.raises(CapabilityMissing) as exc:
        doctor.require("qdisc:htb", "qdisc:netem", "dev:kvm")
    assert str(exc.value) == "qdisc:netem: netem is missing; dev:kvm: kvm is missing"
    doctor.require("qdisc:htb")  # all present: no exception


def test_probe_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown doctor probe"):
        doctor.probe("no-such-probe")


def test_report_json_shape():
    probes = [*_all_essential_ok(), _probe("qdisc:netem", False, "netem is missing")]
    report = doctor.report_json(probes)
    json.dumps(report)  # serialisable
    assert report["ok"] is True  # a missing optional capability does not fail the report
    assert report["missing"] == ["qdisc:netem"]
    assert report["essential"] == list(doctor.ESSENTIAL)
    netem = report["probes"][-1]
    assert netem == {"name": "qdisc:netem", "ok": False, "detail": "some detail",
                     "reason": "netem is missing", "needed_for": "some feature", "essential": False}
    assert all(p["essential"] for p in report["probes"][:-1])


def test_essential_failure_fails_report():
    probes = _all_essential_ok()
    probes[0] = _probe(probes[0].name, False, "nope")
    assert doctor.report_json(probes)["ok"] is False
    # An essential probe that was not run at all also counts as missing.
    assert doctor.essential_ok(_all_essential_ok()[1:]) is False


def test_render_table_renders():
    buf = io.StringIO()
    console = Console(file=buf, width=200, color_system=None)
    probes = [_probe("qdisc:htb", True),
              _probe("qdisc:netem", False, "tc: [brackets] are not markup"),
              _probe("root", False, "not root")]
    doctor.render_table(probes, console)
    out = buf.getvalue()
    for text in ("capability", "status", "detail", "reason / needed for", "qdisc:htb", "ok", "missing",
                 "[brackets] are not markup", "some feature"):
        assert text in out


def test_kernel_version_and_protocols_parsing():
    assert doctor._kernel_version("6.18.44-fc-v595") == (6, 18)
    assert doctor._kernel_version("5.4.0") == (5, 4)
    assert doctor._kernel_version("garbage") == (0, 0)
    assert doctor._mptcp_registered("protocol  size\nMPTCPv6   2064\nMPTCP     1936\n")
    assert not doctor._mptcp_registered("protocol  size\nMPTCPv6   2064\nTCP 1\n")


def test_parse_mptcp_info():
    data = bytes([2, 0, 0, 8, 0, 0, 0, 0]) + (0).to_bytes(4, "little") + (0xdeadbeef).to_bytes(4, "little")
    detail = doctor._parse_mptcp_info(data + bytes(80))
    assert "96 bytes" in detail and "0xdeadbeef" in detail and "2 additional" in detail


def test_tool_missing():
    p = doctor.probe_tool("definitely-not-a-tool-xyz", ["--version"])
    assert not p.ok and "not installed" in p.reason


def test_device_missing():
    p = doctor.probe_device("/dev/definitely-not-a-device")
    assert not p.ok and p.name == "dev:definitely-not-a-device" and "does not exist" in p.reason


def test_scratch_probes_without_root_say_so(monkeypatch):
    monkeypatch.setattr(doctor, "_is_root", lambda: False)
    p = doctor.probe_qdisc("htb")
    assert not p.ok and "without root" in p.reason


def test_main_bad_argument_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        doctor.main(["--bogus"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unrecognized arguments: --bogus" in err


def test_main_exit_code_follows_essentials(monkeypatch, capsys):
    optional_missing = [*_all_essential_ok(), _probe("qdisc:netem", False, "netem is missing")]
    monkeypatch.setattr(doctor, "run_all", lambda: optional_missing)
    assert doctor.main(["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["missing"] == ["qdisc:netem"]

    broken = [_probe("root", False, "not root"), *_all_essential_ok()[1:]]
    monkeypatch.setattr(doctor, "run_all", lambda: broken)
    assert doctor.main([]) == 1
    assert "essential capabilities missing: root" in capsys.readouterr().out


# --- facts of this machine (root) --------------------------------------------------------------

@needs_root
def test_htb_ok():
    assert doctor.probe_qdisc("htb").ok


@needs_root
def test_netem_missing_with_reason():
    p = doctor.probe_qdisc("netem")
    assert not p.ok
    assert "netem" in p.reason and "tc:" in p.reason


@needs_root
def test_mptcp_socket_ok():
    p = doctor.probe_mptcp_socket()
    assert p.ok, p.reason


@needs_root
def test_mptcp_info_ok():
    p = doctor.probe_mptcp_info()
    assert p.ok, p.reason
    assert "token 0x" in p.detail


@needs_root
def test_sysctls_read_in_fresh_namespace():
    probes = {p.name: p for p in doctor.probe_mptcp_sysctls()}
    assert probes["sysctl:net.mptcp.enabled"].ok
    assert probes["sysctl:net.mptcp.enabled"].detail == "1"


@needs_root
def test_probe_is_cached_and_require_skips_message():
    assert doctor.probe("qdisc:htb") is doctor.probe("qdisc:htb")
    doctor.require("qdisc:htb", "socket:mptcp", "sysctl:net.mptcp.enabled")
    with pytest.raises(CapabilityMissing, match=r"^qdisc:netem: the netem qdisc"):
        doctor.require("qdisc:netem")


@needs_root
def test_run_all_leaves_no_namespace():
    probes = doctor.run_all()
    by_name = {p.name: p for p in probes}
    assert doctor.essential_ok(probes), [p for p in probes if not p.ok]
    assert not by_name["qdisc:netem"].ok
    assert _our_netns() == []


@needs_root
def test_namespace_removed_on_exception():
    with pytest.raises(RuntimeError), doctor._scratch_netns("boom", veth=True) as ns:
        assert ns.startswith(f"{run_prefix()}-doctor-")
        assert ns in _our_netns()
        raise RuntimeError("inside")
    assert _our_netns() == []
