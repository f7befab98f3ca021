"""A guest kernel for real (root, qemu, a Debian kernel package): it boots, takes a host's place,
carries an MPTCP transfer to and from this machine's kernel, hands its taps back, and leaves
nothing behind, even when the run that started it is killed with SIGKILL.

One guest (Debian's 6.1, under TCG here) serves the whole module, as it serves a session of cases."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conformance.endpoints.guest import endpoint, kernels, vm
from conformance.endpoints.linux import MptcpConfig
from conformance.lab import Lab
from conformance.net.cleanup import Cleanup
from conformance.net.names import pids_in_netns, sweep_stale
from conformance.net.registry import make_topology
from conformance.proc import NETNS_DIR

VERSION = "6.1"
REPO = Path(__file__).resolve().parents[1]


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root (namespaces, taps)"
    missing = [t for t in (vm.QEMU, "busybox", "gcc", "cpio", "apt-get") if subprocess.run(
        ["which", t], capture_output=True, check=False).returncode]
    return f"not installed: {', '.join(missing)} (ci/setup.sh installs them)" if missing else None


pytestmark = pytest.mark.skipif(_why_not() is not None, reason=_why_not() or "")


@pytest.fixture(scope="module")
def guest_kernel() -> kernels.Kernel:
    return kernels.fetch(VERSION)


@pytest.fixture(autouse=True)
def _no_guest_outlives_its_test() -> Iterator[None]:
    # A session keeps its guests; a test here must not: tests of other modules on the same
    # pytest-xdist worker check that no namespace of this run is left behind.
    try:
        yield
    finally:
        endpoint.shutdown()


def _lab(tmp_path: Path, cleanup: Cleanup, **roles: str) -> Lab:
    return Lab(make_topology("two_path"), tmp_path, cleanup, implementations={"client": "linux", "server": "linux",
                                                                               **roles})


def test_a_guest_server_carries_mptcp_with_this_kernel_and_gives_its_taps_back(tmp_path: Path,
                                                                             guest_kernel: kernels.Kernel) -> None:
    cleanup = Cleanup()
    try:
        lab = _lab(tmp_path, cleanup, server=f"linux-{VERSION}-kvm")
        seat = lab.seats["s1"]
        assert seat.guest.uname() == guest_kernel.release
        lab.two_subflows()
        run = lab.transfer(up=300_000, down=200_000, wait_subflows=2)
        assert run.server["ok"] and run.client["ok"], (run.server, run.client)
        assert run.server["implementation"] == f"guest {guest_kernel.release}"
        # The guest kernel's own MIB counters, read in its case namespace: it accepted the join.
        assert run.counters["s1"].get("MPTcpExtMPJoinAckRx") == 1, run.counters["s1"]
        assert run.server["mptcp_info"]["token"] != "00000000"
        lab.finish()
        assert lab.expect.failures == [], lab.expect.failures
        guest = seat.guest
    finally:
        cleanup.run()
    # The taps are back home, the console and the replayed set-up are artefacts.
    links = json.loads(subprocess.run(["ip", "-n", guest.home, "-j", "link", "show"], capture_output=True,
                                      text=True, check=True).stdout)
    assert {guest.tap(i) for i in range(guest.nics)} <= {link["ifname"] for link in links}
    assert (tmp_path / "guest-s1-setup.sh").read_text().count("addr add") == 1
    assert (tmp_path / "guest-s1-console.log").exists()


def test_the_next_case_gets_a_fresh_namespace_in_the_same_guest(tmp_path: Path,
                                                                guest_kernel: kernels.Kernel) -> None:
    guest = None
    for case in ("first", "second"):
        cleanup = Cleanup()
        try:
            lab = _lab(tmp_path / case, cleanup, client=f"linux-{VERSION}-kvm")
            seat = lab.seats["c1"]
            if guest is None:
                guest, boots = seat.guest, seat.guest.boot_seconds
                lab.configure("c1", MptcpConfig(checksum=True, subflows=1))
            else:
                # One boot serves both; nothing of the first case is left: no limits, endpoints or
                # sysctls set by it, MIB counters from zero.
                assert seat.guest is guest and guest.boot_seconds == boots
                assert endpoint.show_endpoints(seat) == []
                assert guest.sh("sysctl -n net.mptcp.checksum_enabled").strip() == "0"
                assert endpoint.read_counters(seat).get("MPTcpExtMPCapableSYNTX", 0) == 0
            run = lab.transfer(up=100_000, down=100_000)
            assert run.client["ok"] and run.server["ok"]
        finally:
            cleanup.run()


CHILD = r"""
import sys
from conformance.endpoints.guest import endpoint
g = endpoint.acquire(sys.argv[1], "c1")
print("up", g.proc.pid, g.home, flush=True)
import time; time.sleep(600)
"""


def test_a_killed_run_leaves_no_qemu_and_its_namespace_is_swept() -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD, VERSION], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        ready, _, _ = select.select([child.stdout], [], [], 120)
        line = child.stdout.readline() if ready else ""
        assert line.startswith("up "), child.stderr.read() if child.poll() is not None else line
        _, qemu, home = line.split()
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{qemu}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{qemu}").exists(), "qemu outlived the run that started it"
        assert (NETNS_DIR / home).exists()  # what the next run's sweep is for
        report = sweep_stale()
        assert home in report.removed_netns and not (NETNS_DIR / home).exists()
    finally:
        if child.poll() is None:
            child.kill()
        for name in os.listdir(NETNS_DIR) if NETNS_DIR.exists() else []:
            if name.startswith(f"mpc{child.pid}-"):
                for pid in pids_in_netns(NETNS_DIR / name):
                    os.kill(pid, signal.SIGKILL)


def test_a_guest_router_gives_its_path_the_delay_with_netem(tmp_path: Path) -> None:
    """Path 1's router is a guest (netem in its kernel), path 2's the host's delay fallback: both
    paths forward, and the guest applies the path's delay on each of its interfaces."""
    cleanup = Cleanup()
    try:
        lab = Lab(make_topology("two_path", delay="5ms", guest_router=VERSION), tmp_path, cleanup)
        seat = lab.seats["r1"]
        qdiscs = seat.guest.sh("/usr/sbin/tc qdisc show")
        for intf in ("r1-eth0", "r1-eth1"):
            assert "netem" in qdiscs and f"dev {intf} root" in qdiscs, qdiscs
        assert "delay 10ms" in qdiscs, qdiscs  # one direction of the path: its two links' delay
        dst = lab.topo.addresses("s1", 4)[0]
        for src in lab.topo.addresses("c1", 4):
            out = subprocess.run(["ip", "netns", "exec", lab.net.netns("c1"), "ping", "-n", "-c", "3", "-I", src,
                                  dst], capture_output=True, text=True, check=False).stdout
            rtts = [float(x.split("=")[1]) for x in out.split() if x.startswith("time=")]
            # Delay is emulated, not measured here (benchmarks/guests.py does): it is at least there.
            assert len(rtts) == 3 and min(rtts) >= 4 * 5, (src, out)
        lab.finish()
        assert lab.expect.failures == []
    finally:
        cleanup.run()
