"""Our driver of the kernel's userspace path manager (conformance.endpoints.userspace_pm), the
`linux-userspace-pm` implementation: its policy from a case's configuration, its netlink
messages, and live joins and announcements it makes the kernel carry out; a case asking it for
what it does not do ends "unsupported"."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conformance.endpoints.linux import EndpointFlags, MptcpConfig, PMEndpoint
from conformance.endpoints.userspace_pm import PMCommand, PMEvent, Unsupported, event_dict, policy_from_config

ROOT = Path(__file__).resolve().parents[1]


def test_the_policy_carries_out_the_in_kernel_configuration() -> None:
    cfg = MptcpConfig(subflows=3, add_addr_accepted=1, endpoints=[
        PMEndpoint("198.18.2.2", EndpointFlags.SUBFLOW | EndpointFlags.BACKUP, dev="c1-eth1"),
        PMEndpoint("198.19.2.2", EndpointFlags.SIGNAL, port=10000),
        PMEndpoint("198.18.3.2", EndpointFlags(0))])  # known to the in-kernel PM only: nothing to do
    policy = policy_from_config(cfg)
    assert (policy.subflows, policy.add_addr_accepted) == (3, 1)
    assert policy.subflow == [{"addr": "198.18.2.2", "id": 1, "dev": "c1-eth1", "backup": True}]
    assert policy.announce == [{"addr": "198.19.2.2", "id": 2, "dev": None, "backup": False, "port": 10000}]
    assert policy_from_config(MptcpConfig()).subflows == 2  # the in-kernel PM's default limit


def test_what_the_driver_does_not_do_is_refused_before_the_case_runs() -> None:
    with pytest.raises(Unsupported, match="fullmesh"):
        policy_from_config(MptcpConfig(endpoints=[PMEndpoint("198.18.2.2", EndpointFlags.SUBFLOW
                                                             | EndpointFlags.FULLMESH)]))


def test_commands_encode_to_the_uapi_layout() -> None:
    msg = PMCommand()
    msg["cmd"], msg["version"] = 10, 1
    msg["attrs"] = [("MPTCP_PM_ATTR_TOKEN", 0xDEADBEEF),
                    ("MPTCP_PM_ATTR_ADDR", {"attrs": [("MPTCP_PM_ADDR_ATTR_FAMILY", socket.AF_INET),
                                                      ("MPTCP_PM_ADDR_ATTR_ADDR4", "198.18.2.2"),
                                                      ("MPTCP_PM_ADDR_ATTR_ID", 1)]}),
                    ("MPTCP_PM_ATTR_ADDR_REMOTE", {"attrs": [("MPTCP_PM_ADDR_ATTR_FAMILY", socket.AF_INET),
                                                             ("MPTCP_PM_ADDR_ATTR_ADDR4", "198.19.0.2"),
                                                             ("MPTCP_PM_ADDR_ATTR_PORT", 5201)]})]
    msg.encode()
    raw = bytes(msg.data)
    # After the netlink (16) and genl (4) headers: TOKEN is attribute 4, a u32 in host order.
    assert raw[20:24] == (8).to_bytes(2, sys.byteorder) + (4).to_bytes(2, sys.byteorder)
    assert raw[24:28] == (0xDEADBEEF).to_bytes(4, sys.byteorder)
    back = PMCommand(raw)
    back.decode()
    remote = back.get_attr("MPTCP_PM_ATTR_ADDR_REMOTE")
    assert remote.get_attr("MPTCP_PM_ADDR_ATTR_ADDR4") == "198.19.0.2"
    assert remote.get_attr("MPTCP_PM_ADDR_ATTR_PORT") == 5201
    assert back.get_attr("MPTCP_PM_ATTR_ADDR").get_attr("MPTCP_PM_ADDR_ATTR_ID") == 1


def test_events_decode_with_ports_in_network_order() -> None:
    ev = PMEvent()
    ev["cmd"], ev["version"] = 6, 1  # MPTCP_EVENT_ANNOUNCED
    ev["attrs"] = [("MPTCP_ATTR_TOKEN", 7), ("MPTCP_ATTR_REM_ID", 3), ("MPTCP_ATTR_DADDR4", "198.19.2.2"),
                   ("MPTCP_ATTR_DPORT", 10000)]
    ev.encode()
    raw = bytes(ev.data)
    assert (10000).to_bytes(2, "big") in raw
    back = PMEvent(raw)
    back.decode()
    assert event_dict(back) == {"event": "announced", "token": 7, "rem_id": 3, "daddr": "198.19.2.2",
                                "dport": 10000}


# -- live -----------------------------------------------------------------------------------------

live = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces)")


def _require() -> None:
    from conformance import doctor
    from conformance.errors import CapabilityMissing

    try:
        doctor.require("root", "socket:mptcp", "tcpdump", "tshark", "mnexec", "ethtool")
    except CapabilityMissing as exc:
        pytest.skip(str(exc))


def _log(folder: Path, node: str) -> list[dict]:
    return [json.loads(line) for line in (folder / f"userspace-pm-{node}.jsonl").read_text().splitlines()]


@live
def test_live_the_daemons_join_and_announce_like_the_in_kernel_pm(tmp_path: Path) -> None:
    _require()
    from conformance.lab import Lab
    from conformance.net.cleanup import Cleanup
    from conformance.net.registry import make_topology

    roles = {"client": "linux-userspace-pm", "server": "linux-userspace-pm"}
    with Cleanup() as cleanup:
        lab = Lab(make_topology("two_path_server", bw=8), tmp_path / "lab", cleanup, implementations=roles)
        announced = lab.addresses("s1")[1]
        lab.configure("s1", MptcpConfig(endpoints=[PMEndpoint(announced, EndpointFlags.SIGNAL, dev="s1-eth1")]))
        lab.configure("c1", MptcpConfig(add_addr_accepted=1))
        run = lab.transfer(up=200_000, down=200_000, wait_subflows=2, timeout=30)
        daemons = list(lab.daemons.values())
        assert all(d.running() for d in daemons)
    assert not any(d.running() for d in daemons)  # stopped with the lab
    assert run.client["ok"] and run.server["ok"] and run.client["subflows_before_bulk"] == 2
    server, client = _log(tmp_path / "lab", "s1"), _log(tmp_path / "lab", "c1")
    assert any(e.get("command", {}).get("cmd") == "announce" and e["command"].get("ok") for e in server)
    heard = [e["event"] for e in client if e.get("event", {}).get("event") == "announced"]
    assert heard and heard[0]["daddr"] == announced
    created = [e["command"] for e in client if e.get("command", {}).get("cmd") == "subflow_create"]
    assert created and created[0].get("ok") and created[0]["args"][2] == announced, created
    assert any(e.get("event", {}).get("event") == "sub_established" for e in client)
    # The kernel did what the daemon asked: an ADD_ADDR out, a join to the announced address in.
    assert run.counter("s1", "MPTcpExtAddAddrTx") >= 1 and run.counter("s1", "MPTcpExtMPJoinAckRx") == 1
    assert run.counter("c1", "MPTcpExtAddAddr") >= 1


CASE = '''
import pytest
from conformance.endpoints.linux import EndpointFlags, MptcpConfig, PMEndpoint

@pytest.mark.rfc8684("R3.2-02")
@pytest.mark.families("ipv4")
def test_fullmesh(lab):
    """Asks for a fullmesh endpoint."""
    lab.configure("c1", MptcpConfig(endpoints=[PMEndpoint(lab.addresses("c1")[1],
                                                          EndpointFlags.SUBFLOW | EndpointFlags.FULLMESH)]))
    lab.transfer()
'''


@live
def test_live_a_case_the_driver_cannot_play_is_unsupported_not_failed(tmp_path: Path) -> None:
    _require()
    (tmp_path / "test_case.py").write_text(textwrap.dedent(CASE))
    report = tmp_path / "report"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(tmp_path / "test_case.py"), "--mptcp-report", str(report),
                           "--mptcp-client", "linux-userspace-pm"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:]  # pytest sees a skip
    case = json.loads((report / "results.json").read_text())["cases"][0]
    assert case["outcome"] == "unsupported", case
    assert "linux-userspace-pm on c1: fullmesh endpoints" in case["reason"]
    assert case["implementations"] == {"client": "linux-userspace-pm", "server": "linux"}
    junit = (report / "junit.xml").read_text()
    assert '<skipped message="unsupported: linux-userspace-pm on c1' in junit
