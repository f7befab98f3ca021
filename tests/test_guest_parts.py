"""The pieces of a guest endpoint that need no guest: which Debian package a version names,
which modules an initramfs carries, how a host's routes and rules are replayed in a guest, and
how the implementation names of guests are read."""

from __future__ import annotations

import lzma
from pathlib import Path

import pytest

from conformance.endpoints.guest import kernels
from conformance.endpoints.guest.seat import _route_command, _rule_command
from conformance.errors import HarnessError
from conformance.implementations import get

_SEARCH = """linux-image-6.1.0-52-amd64 - Linux 6.1 for 64-bit PCs (signed)
linux-image-6.1.0-56-amd64 - Linux 6.1 for 64-bit PCs (signed)
linux-image-6.1.0-56-cloud-amd64 - Linux 6.1 for x86-64 cloud (signed)
linux-image-6.1.0-56-rt-amd64 - Linux 6.1 for 64-bit PCs (signed), PREEMPT_RT
linux-image-6.1.0-56-amd64-dbg - Debug symbols for linux-image-6.1.0-56-amd64
linux-image-6.1.0-9-amd64 - Linux 6.1 for 64-bit PCs (signed)
linux-image-6.10.2-amd64 - not a 6.1 at all
linux-image-6.12-amd64 - Linux for 64-bit PCs (meta-package)
linux-image-6.12.117+deb12-amd64 - Linux 6.12 for 64-bit PCs (signed)
linux-image-6.12.117+deb12-amd64-unsigned - Linux 6.12 for 64-bit PCs
"""


@pytest.fixture
def apt(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake(argv: list[str], what: str, cwd: Path | None = None) -> str:
        assert argv[:3] == ["apt-cache", "search", "--names-only"]
        prefix = argv[3].removeprefix("^")
        return "".join(line + "\n" for line in _SEARCH.splitlines() if line.startswith(prefix.replace("\\", "")))

    monkeypatch.setattr(kernels, "_apt", fake)


def test_a_version_names_the_newest_plain_amd64_package(apt: None) -> None:
    # 6.1 is never 6.10, never a cloud, realtime, debug or unsigned flavour, never the meta-package.
    assert kernels._resolve("6.1") == "linux-image-6.1.0-56-amd64"
    assert kernels._resolve("6.12") == "linux-image-6.12.117+deb12-amd64"
    assert kernels._resolve("6.1.0-52") == "linux-image-6.1.0-52-amd64"
    with pytest.raises(HarnessError, match="no installable Debian package"):
        kernels._resolve("5.10")
    with pytest.raises(ValueError, match="expected a Debian kernel version"):
        kernels.resolve("six")


def _module(deps: str) -> bytes:
    return b"\x7fELF....\0license=GPL\0depends=" + deps.encode() + b"\0vermagic=6.1\0"


def test_modules_come_with_their_dependencies_first_and_decompressed(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    base = tree / "lib/modules/6.1.0-56-amd64/kernel"
    base.mkdir(parents=True)
    files = {"virtio_ring": "", "virtio": "virtio_ring", "virtio_pci": "virtio_ring,virtio",
             "failover": "", "net_failover": "failover", "virtio_net": "virtio_ring,virtio,net_failover",
             "virtio_console": "virtio", "sch_netem": "", "unrelated": ""}
    for name, deps in files.items():
        (base / f"{name}.ko.xz").write_bytes(lzma.compress(_module(deps)))
    out = tmp_path / "out"
    out.mkdir()
    order = kernels._pick_modules(tree, "6.1.0-56-amd64", {}, out)
    assert "unrelated" not in order and set(order) == set(files) - {"unrelated"}
    for name in order:
        for dep in filter(None, files[name].split(",")):
            assert order.index(dep) < order.index(name), (dep, name)
    assert (out / "virtio_net.ko").read_bytes() == _module(files["virtio_net"])


def test_a_module_built_in_is_not_needed_but_a_missing_one_is_an_error(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "lib/modules/6.12/kernel").mkdir(parents=True)
    (tree / "lib/modules/6.12/kernel/virtio_net.ko.xz").write_bytes(lzma.compress(_module("")))
    (tree / "lib/modules/6.12/kernel/sch_netem.ko.xz").write_bytes(lzma.compress(_module("")))
    builtin = {"CONFIG_VIRTIO_PCI": "y", "CONFIG_VIRTIO_CONSOLE": "y"}
    assert kernels._pick_modules(tree, "6.12", builtin, tmp_path) == ["virtio_net", "sch_netem"]
    with pytest.raises(HarnessError, match="module virtio_pci"):
        kernels._pick_modules(tree, "6.12", {}, tmp_path)


def test_host_routes_and_rules_are_replayed_except_what_the_kernel_makes() -> None:
    assert _route_command({"dst": "default", "gateway": "198.18.1.1", "dev": "c1-eth0", "table": "101"},
                          4) == "-4 route add default via 198.18.1.1 dev c1-eth0 table 101"
    assert _route_command({"dst": "198.18.1.0/24", "dev": "c1-eth0", "protocol": "kernel", "scope": "link",
                           "prefsrc": "198.18.1.2"}, 4) is None
    assert _route_command({"type": "local", "dst": "198.18.1.2", "dev": "c1-eth0", "table": "local"}, 4) is None
    assert _route_command({"dst": "fe80::/64", "dev": "c1-eth0", "protocol": "kernel"}, 6) is None
    v6 = {"dst": "2001:db8:2::/48", "gateway": "2001:db8:1:1::1", "dev": "c1-eth0", "metric": 1024}
    assert _route_command(v6, 6) == "-6 route add 2001:db8:2::/48 via 2001:db8:1:1::1 dev c1-eth0 metric 1024"
    assert _rule_command({"priority": 32766, "src": "all", "table": "main"}, 4) is None
    assert _rule_command({"priority": 100, "src": "198.18.2.2", "srclen": 32, "table": "102"}, 4) == \
        "-4 rule add priority 100 from 198.18.2.2/32 table 102"


def test_any_debian_kernel_version_is_a_guest_implementation() -> None:
    named = (("linux-6.1-kvm", "6.1"), ("linux-6.12-kvm", "6.12"), ("linux-6.1.0-52-kvm", "6.1.0-52"))
    for name, version in named:
        impl = get(name)
        assert (impl.kind, impl.guest) == ("vm", version)
    with pytest.raises(ValueError, match="linux-<Debian kernel version>-kvm"):
        get("linux-kvm")


def test_a_console_that_shows_an_oops_or_a_warning_is_caught_and_a_quiet_one_is_not() -> None:
    from conformance.endpoints.guest.vm import oopses

    quiet = "[    3.51] netem: version 1.3\nmptcp-guest: agent on /dev/vport0p1\n"
    assert oopses(quiet) == []
    broken = quiet + ("[   12.30] ------------[ cut here ]------------\n"
                      "[   12.30] WARNING: CPU: 0 PID: 57 at net/mptcp/protocol.c:1234 __mptcp_clean_una+0x1/0x2\n"
                      "[   12.31] Call Trace:\n"
                      "[   13.00] BUG: kernel NULL pointer dereference, address: 0000000000000008\n")
    found = oopses(broken)
    assert len(found) == 3 and found[0].startswith("[   12.30] WARNING: CPU: 0")
