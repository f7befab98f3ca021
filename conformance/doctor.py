"""What this machine can do for the suite: one probe per capability, each trying the real thing.

Every probe that touches networking does it inside a throwaway namespace
`<run prefix>-doctor-<tag>-<n>`, removed in `finally`, so the host's qdiscs, firewall and MPTCP
endpoints are never changed. A missing capability becomes a Probe with ok=False and one sentence
saying what is missing and what that disables; cases turn it into a skip through `require()`."""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import itertools
import json
import os
import platform
import shutil
import socket
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from conformance.errors import CapabilityMissing, CommandError
from conformance.proc import in_netns, run

IPPROTO_MPTCP = 262
SOL_MPTCP = 284
MPTCP_INFO = 1
# The 6.1 uapi struct is 48 bytes; newer kernels append fields. Asking for more is harmless
# (the kernel copies min(optlen, sizeof)), and 96 covers the fields the suite reads today.
MPTCP_INFO_LEN = 96
# MPTCP landed upstream (RFC 8684 v1) in 5.6; older "MPTCP" kernels are the out-of-tree v0 fork.
MIN_KERNEL = (5, 6)

# A failing essential probe makes `doctor` exit 1: without these no case can run or be judged.
ESSENTIAL = ("root", "kernel", "socket:mptcp", "sockopt:mptcp_info", "ip-mptcp", "tshark", "tcpdump",
             "mnexec", "ethtool", "qdisc:htb")


@dataclass(frozen=True)
class Probe:
    name: str
    ok: bool
    detail: str
    reason: str
    needed_for: str


class _NeedsRoot(Exception):
    """A probe needs a throwaway namespace, which only root can create."""


_NEEDS_ROOT_REASON = ("cannot be checked without root, since trying it needs a throwaway network namespace "
                      "(run `mptcp-conformance doctor` as root)")


def _attempt(name: str, needed_for: str, body: Callable[[], Probe]) -> Probe:
    """Run one probe body; whatever it raises becomes a failed Probe instead of an exception,
    so that one broken probe (or a non-root run) never hides the others."""
    try:
        return body()
    except _NeedsRoot:
        return Probe(name, False, "", f"{name} {_NEEDS_ROOT_REASON}", needed_for)
    except Exception as exc:
        return Probe(name, False, "", f"the {name} probe itself failed ({type(exc).__name__}: {exc})",
                     needed_for)


def _is_root() -> bool:
    return os.geteuid() == 0


def _tail(text: str) -> str:
    """The last non-empty line of a tool's output: that is where tc/iptables/nft put the error."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no error message"


def _command_error(exc: CommandError) -> str:
    return _tail(exc.stderr or exc.stdout) if exc.rc != 127 else f"{exc.argv[0]} is not installed"


# --- throwaway namespaces ---------------------------------------------------------------------

_scratch_counter = itertools.count()


@contextlib.contextmanager
def _scratch_netns(tag: str, *, veth: bool = False) -> Iterator[str]:
    """A fresh namespace with `lo` up (and, with veth=True, a veth pair d0/d1 up), removed on exit.

    veth rather than dummy: this kernel family is often built without CONFIG_DUMMY, and the suite's
    links are veth anyway, so a qdisc accepted here is one the topology can use."""
    from pyroute2 import netns as pr_netns

    from conformance.net.names import remove_netns, run_prefix

    if not _is_root():
        raise _NeedsRoot(tag)
    name = f"{run_prefix()}-doctor-{tag}-{next(_scratch_counter)}"
    try:
        pr_netns.create(name)
        script = "link set lo up\n"
        if veth:
            script += "link add d0 type veth peer name d1\nlink set d0 up\nlink set d1 up\n"
        run(["ip", "-batch", "-"], netns=name, input=script, timeout=10)
        yield name
    finally:
        # Also after a partial create (bind-mount file left behind): remove_netns copes with both.
        remove_netns(name)


# --- process, kernel, sysctls -----------------------------------------------------------------

def probe_root() -> Probe:
    needed = "creating namespaces, links, qdiscs and firewall rules (every case)"

    def body() -> Probe:
        euid = os.geteuid()
        if euid == 0:
            return Probe("root", True, "euid 0", "", needed)
        return Probe("root", False, f"euid {euid}",
                     f"not running as root (euid {euid}): network namespaces, veth links, qdiscs and "
                     "firewall rules cannot be set up, so no case can run", needed)

    return _attempt("root", needed, body)


def _kernel_version(release: str) -> tuple[int, int]:
    """(major, minor) from a uname release such as '6.18.44-fc-v595'; (0, 0) if unparsable."""
    parts = release.split("-", 1)[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


def _mptcp_registered(protocols: str) -> bool:
    return any(line.split()[:1] == ["MPTCP"] for line in protocols.splitlines())


def probe_kernel() -> Probe:
    needed = "every MPTCP case"

    def body() -> Probe:
        release = platform.release()
        version = _kernel_version(release)
        try:
            registered = _mptcp_registered(Path("/proc/net/protocols").read_text())
        except OSError:
            registered = False
        detail = f"Linux {release}, MPTCP protocol {'registered' if registered else 'not registered'}"
        if version < MIN_KERNEL:
            return Probe("kernel", False, detail,
                         f"kernel {release} predates upstream MPTCP ({MIN_KERNEL[0]}.{MIN_KERNEL[1]}): "
                         "no RFC 8684 implementation to test", needed)
        if not registered:
            return Probe("kernel", False, detail,
                         f"kernel {release} has no MPTCP protocol in /proc/net/protocols (built without "
                         "CONFIG_MPTCP): no MPTCP connection can be made", needed)
        return Probe("kernel", True, detail, "", needed)

    return _attempt("kernel", needed, body)


_SYSCTL_NEEDS = {
    "enabled": "every MPTCP case (0 makes socket(IPPROTO_MPTCP) fail)",
    "checksum_enabled": "DSS checksum and MP_FAIL cases",
    "allow_join_initial_addr_port": "C-flag (deny join to initial address) cases",
    "add_addr_timeout": "ADD_ADDR retransmission cases",
    "pm_type": "userspace path-manager cases",
    "path_manager": "userspace path-manager cases",
    "available_path_managers": "userspace path-manager cases",
    "scheduler": "packet-scheduler selection",
    "available_schedulers": "packet-scheduler selection",
    "stale_loss_cnt": "stale-subflow (link failure) cases",
    "syn_retrans_before_tcp_fallback": "MP_CAPABLE SYN blackhole fallback cases",
    "blackhole_timeout": "MP_CAPABLE SYN blackhole fallback cases",
    "close_timeout": "connection close timing",
}
_SYSCTL_DIR = Path("/proc/sys/net/mptcp")


def _read_sysctls(directory: Path) -> list[Probe] | None:
    """One Probe per sysctl file in `directory`, or None when the directory does not exist."""
    if not directory.is_dir():
        return None
    probes = []
    for path in sorted(directory.iterdir()):
        name = f"sysctl:net.mptcp.{path.name}"
        needed = _SYSCTL_NEEDS.get(path.name, "cases that set this knob")
        try:
            value = " ".join(path.read_text().split())
        except OSError as exc:
            probes.append(Probe(name, False, "", f"net.mptcp.{path.name} exists but cannot be read "
                                f"({exc.strerror}): cases that set it cannot check its value", needed))
            continue
        if path.name == "enabled" and value != "1":
            probes.append(Probe(name, False, value,
                                f"net.mptcp.enabled is {value} in a fresh namespace: "
                                "socket(IPPROTO_MPTCP) is refused, so no MPTCP connection can be made",
                                needed))
        else:
            probes.append(Probe(name, True, value, "", needed))
    return probes


def probe_mptcp_sysctls() -> list[Probe]:
    """The net.mptcp.* sysctls as a fresh namespace (which is what every node gets) sees them.

    Without root no namespace can be made, so the current namespace is read instead; presence is
    the same, only values the host changed may differ."""
    needed = "every MPTCP case"
    try:
        if _is_root():
            with _scratch_netns("sysctl") as ns, in_netns(ns):
                probes = _read_sysctls(_SYSCTL_DIR)
        else:
            probes = _read_sysctls(_SYSCTL_DIR)
    except Exception as exc:
        return [Probe("sysctl:net.mptcp", False, "",
                      f"the sysctl:net.mptcp probe itself failed ({type(exc).__name__}: {exc})", needed)]
    if probes is None:
        return [Probe("sysctl:net.mptcp", False, "",
                      f"{_SYSCTL_DIR} does not exist (kernel built without CONFIG_MPTCP): no MPTCP knob "
                      "can be set and no MPTCP connection can be made", needed)]
    return probes


@contextlib.contextmanager
def _probe_place(tag: str) -> Iterator[None]:
    """Inside a throwaway namespace when root; otherwise the current one (sockets need no root)."""
    if _is_root():
        with _scratch_netns(tag) as ns, in_netns(ns):
            yield
    else:
        yield


# --- MPTCP sockets ----------------------------------------------------------------------------

def _socket_error_reason(exc: OSError) -> str:
    if exc.errno == errno.EPROTONOSUPPORT:
        why = "the kernel does not support IPPROTO_MPTCP (built without CONFIG_MPTCP)"
    elif exc.errno == errno.ENOPROTOOPT:
        why = "MPTCP is disabled (net.mptcp.enabled=0)"
    else:
        why = f"socket(AF_INET, SOCK_STREAM, IPPROTO_MPTCP) failed: {exc.strerror}"
    return f"{why}: no MPTCP connection can be made, so no case can run"


def probe_mptcp_socket() -> Probe:
    needed = "every MPTCP case"

    def body() -> Probe:
        with _probe_place("socket"):
            try:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
            except OSError as exc:
                return Probe("socket:mptcp", False, f"errno {exc.errno}", _socket_error_reason(exc), needed)
            sock.close()
        return Probe("socket:mptcp", True, "socket(AF_INET, SOCK_STREAM, IPPROTO_MPTCP) accepted", "", needed)

    return _attempt("socket:mptcp", needed, body)


def _parse_mptcp_info(data: bytes) -> str:
    """A short human summary of the leading, stable fields of struct mptcp_info."""
    if len(data) < 16:
        return f"{len(data)} bytes"
    subflows = data[0]
    token = struct.unpack_from("=I", data, 12)[0]
    return f"{len(data)} bytes, token 0x{token:08x}, {subflows} additional subflow(s)"


def probe_mptcp_info() -> Probe:
    needed = "telling MPTCP from TCP fallback on live sockets (MP_CAPABLE, fallback and counter checks)"
    name = "sockopt:mptcp_info"

    def body() -> Probe:
        with _probe_place("info"), contextlib.ExitStack() as stack:
            try:
                listener = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM,
                                                             IPPROTO_MPTCP))
                listener.settimeout(3)
                listener.bind(("127.0.0.1", 0))
                listener.listen(1)
                client = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM,
                                                           IPPROTO_MPTCP))
                client.settimeout(3)
                client.connect(listener.getsockname())
                server, _ = listener.accept()
                stack.enter_context(server)
            except OSError as exc:
                return Probe(name, False, "",
                             f"an MPTCP connection over loopback could not be set up ({exc}): "
                             "MPTCP_INFO cannot be checked and no MPTCP case can run", needed)
            try:
                data = client.getsockopt(SOL_MPTCP, MPTCP_INFO, MPTCP_INFO_LEN)
            except OSError as exc:
                fallback = " (the connection fell back to TCP)" if exc.errno == errno.EOPNOTSUPP else ""
                return Probe(name, False, "",
                             f"getsockopt(SOL_MPTCP, MPTCP_INFO) failed on a loopback MPTCP connection"
                             f"{fallback}: {exc.strerror}: the suite cannot tell MPTCP from TCP fallback",
                             needed)
        return Probe(name, True, _parse_mptcp_info(data), "", needed)

    return _attempt(name, needed, body)


# --- iproute2, tc, netfilter ------------------------------------------------------------------

def _scratch_command_probe(name: str, tag: str, needed: str, commands: list[tuple[list[str], str | None]],
                           failed: Callable[[CommandError], str], version_argv: list[str],
                           detail: Callable[[str, list[str]], str], *, veth: bool = False) -> Probe:
    """A probe that runs `commands` (argv, stdin) in a scratch namespace: ok when all succeed.
    `failed` turns the failing command into the reason, `detail` the tool version and outputs into
    what is shown."""

    def body() -> Probe:
        outputs = []
        with _scratch_netns(tag, veth=veth) as ns:
            try:
                for argv, stdin in commands:
                    outputs.append(run(argv, netns=ns, input=stdin, timeout=10).stdout)
            except CommandError as exc:
                return Probe(name, False, "", failed(exc), needed)
        version = run(version_argv, timeout=10, check=False).stdout.strip() if version_argv else ""
        return Probe(name, True, detail(version, outputs), "", needed)

    return _attempt(name, needed, body)


def probe_ip_mptcp() -> Probe:
    return _scratch_command_probe(
        "ip-mptcp", "ipmptcp",
        "path-manager endpoints and limits (MP_JOIN, ADD_ADDR, REMOVE_ADDR, MP_PRIO cases)",
        [(["ip", "mptcp", "endpoint", "show"], None), (["ip", "mptcp", "limits", "show"], None)],
        lambda exc: (f"`{' '.join(exc.argv)}` failed ({_command_error(exc)}): MPTCP endpoints and "
                     "limits cannot be configured"),
        ["ip", "-V"], lambda version, out: f"{version}; limits: {' '.join(out[-1].split())}")


_QDISC_ARGS = {
    "netem": ["netem", "delay", "1ms"],
    "htb": ["htb", "default", "1"],
    "tbf": ["tbf", "rate", "1mbit", "burst", "32kbit", "latency", "50ms"],
}
_QDISC_NEEDS = {
    "netem": ("link delay, jitter, loss and reordering (delay=, jitter=, loss= on links)",
              "link delay, jitter and loss cannot be emulated"),
    "htb": ("link bandwidth limits (bw= on links)", "link bandwidth (bw=) cannot be limited"),
    "tbf": ("token-bucket rate limits and bottleneck queues",
            "token-bucket shaping of bottleneck links is unavailable"),
}


def probe_qdisc(kind: str) -> Probe:
    """Whether `tc qdisc add ... root <kind>` is accepted on a veth (netem, htb or tbf)."""
    name = f"qdisc:{kind}"
    needed, disables = _QDISC_NEEDS.get(kind, (f"{kind} shaping", f"the {kind} qdisc cannot be used"))

    if kind not in _QDISC_ARGS:
        return Probe(name, False, "", f"no minimal arguments known for qdisc {kind!r} "
                     f"(known: {sorted(_QDISC_ARGS)})", needed)

    def failed(exc: CommandError) -> str:
        err = _command_error(exc)
        missing = "is missing from this kernel" if "unknown" in err.lower() else "was refused by this kernel"
        return f"the {kind} qdisc {missing} (tc: {err}): {disables}"

    return _scratch_command_probe(
        name, f"qdisc-{kind}", needed, [(["tc", "qdisc", "add", "dev", "d0", "root", *_QDISC_ARGS[kind]], None)],
        failed, [], lambda version, out: " ".join(_QDISC_ARGS[kind]) + " accepted", veth=True)


_IPTABLES_ARGS = {
    "TCPOPTSTRIP": ["-t", "mangle", "-A", "POSTROUTING", "-p", "tcp", "-j", "TCPOPTSTRIP",
                    "--strip-options", "30"],
    "NFQUEUE": ["-A", "OUTPUT", "-p", "tcp", "-j", "NFQUEUE", "--queue-num", "1", "--queue-bypass"],
}
_IPTABLES_NEEDS = {
    "TCPOPTSTRIP": ("option-stripping middleboxes (MP_CAPABLE fallback cases)",
                    "middleboxes that strip MPTCP options cannot be emulated"),
    "NFQUEUE": ("user-space packet shims (forged options, delay/reorder without netem)",
                "packets cannot be handed to user space for forging, delaying or reordering"),
}


def probe_iptables_target(target: str) -> Probe:
    """Whether iptables accepts a rule with `target` (TCPOPTSTRIP or NFQUEUE) in a fresh namespace."""
    name = f"iptables:{target}"
    needed, disables = _IPTABLES_NEEDS.get(target, (f"rules using {target}",
                                                    f"{target} rules cannot be used"))

    if target not in _IPTABLES_ARGS:
        return Probe(name, False, "", f"no test rule known for iptables target {target!r} "
                     f"(known: {sorted(_IPTABLES_ARGS)})", needed)
    return _scratch_command_probe(
        name, f"ipt-{target.lower()}", needed, [(["iptables", *_IPTABLES_ARGS[target]], None)],
        lambda exc: f"iptables rejected a {target} rule ({_command_error(exc)}): {disables}",
        ["iptables", "--version"], lambda version, out: f"{version}: {target} rule accepted")


# The suite's nft middleboxes match MPTCP options by subtype, so that is what is loaded here.
_NFT_TABLE = """table inet mpcdoctor {
  chain out {
    type filter hook output priority 0;
    tcp option mptcp exists counter
  }
}
"""


def probe_nft() -> Probe:
    return _scratch_command_probe(
        "nft", "nft", "nft middleboxes (MPTCP option matching, payload rewriting for MP_FAIL)",
        [(["nft", "-f", "-"], _NFT_TABLE)],
        lambda exc: (f"nft could not load a table matching MPTCP options ({_command_error(exc)}): "
                     "nft-based middleboxes cannot be built"),
        ["nft", "--version"], lambda version, out: f"{version}: table with `tcp option mptcp` loaded")


# --- tools and devices ------------------------------------------------------------------------

_TOOL_NEEDS = {
    "tshark": ("decoding MPTCP options from captures (every wire-level check)",
               "captures cannot be decoded, so no wire-level check can be judged"),
    "tcpdump": ("packet captures on links", "no packet capture can be taken"),
    "mnexec": ("Mininet node processes (every topology)", "no Mininet topology can be started"),
    "ethtool": ("toggling TSO/GSO/GRO offloads on links", "offloads cannot be turned off, so captures "
                "show super-packets instead of wire segments"),
}


def probe_tool(name: str, version_args: list[str]) -> Probe:
    """Whether `name` is on PATH and `name *version_args` succeeds; detail is its first output line."""
    needed, disables = _TOOL_NEEDS.get(name, (name, f"features using {name} are unavailable"))

    def body() -> Probe:
        path = shutil.which(name)
        if path is None:
            return Probe(name, False, "", f"{name} is not installed (not found on PATH): {disables}", needed)
        try:
            cp = run([path, *version_args], timeout=10)
        except CommandError as exc:
            return Probe(name, False, path,
                         f"`{name} {' '.join(version_args)}` failed (exit {exc.rc}: {_command_error(exc)}): "
                         f"{disables}", needed)
        # Prefer stdout: tshark puts a "running as root" warning on stderr before its version.
        lines = [ln.strip() for ln in (cp.stdout + "\n" + cp.stderr).splitlines() if ln.strip()]
        detail = lines[0] if lines else f"{path} (prints no version)"
        return Probe(name, True, detail, "", needed)

    return _attempt(name, needed, body)


_DEVICE_NEEDS = {
    "/dev/net/tun": ("TUN/TAP interfaces (user-space links and middleboxes, VM networking)",
                     "TUN/TAP interfaces cannot be created"),
    "/dev/kvm": ("KVM-accelerated VMs for testing other kernels (optional; TCG works without it)",
                 "other kernels can only be booted under slow software emulation"),
}


def probe_device(path: str) -> Probe:
    """Whether the character device `path` exists and opens read-write.

    For /dev/kvm this is all that is checked: whether a guest kernel actually boots is not."""
    name = "dev:" + path.removeprefix("/dev/")
    needed, disables = _DEVICE_NEEDS.get(path, (path, f"features using {path} are unavailable"))

    def body() -> Probe:
        if not os.path.exists(path):
            return Probe(name, False, "", f"{path} does not exist: {disables}", needed)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            return Probe(name, False, "exists", f"{path} exists but cannot be opened ({exc.strerror}): "
                         f"{disables}", needed)
        os.close(fd)
        detail = "exists and opens read-write"
        if path == "/dev/kvm":
            detail += " (guest boot not tested)"
        return Probe(name, True, detail, "", needed)

    return _attempt(name, needed, body)


def probe_guest_accelerator() -> Probe:
    """Whether other kernels can be booted as guests here, and how: KVM where it boots Debian's
    kernels, else TCG software emulation. Detection boots a guest once per kernel (the result
    is kept in the cache); before any kernel is fetched only the prerequisites are checked."""
    name, needed = "guest:accelerator", "other kernels as endpoints (linux-<version>-kvm implementations)"

    def body() -> Probe:
        from conformance.endpoints.guest import kernels, vm

        missing = [tool for tool in (vm.QEMU, "busybox", "gcc", "cpio") if shutil.which(tool) is None]
        if missing:
            return Probe(name, False, "", f"{', '.join(missing)} not installed: no guest kernel can be booted "
                         "(ci/setup.sh installs qemu-system-x86, busybox-static, gcc, cpio)", needed)
        fetched = kernels.cached()
        if not fetched:
            kvm = "usable /dev/kvm, boot not yet tried" if vm.kvm_usable() else "no usable /dev/kvm"
            return Probe(name, True, f"qemu present; {kvm}; TCG available; no guest kernel fetched yet", "",
                         needed)
        parts, whys = [], set()
        for kernel in fetched:
            accel = vm.accelerator(kernel)
            parts.append(f"{kernel.release}: {accel.upper()}")
            if accel == "tcg":
                why = (vm.accelerator_known(kernel.release) or {}).get("why", "")
                whys.add(why.splitlines()[0][:90] if why else "")
        detail = "; ".join(parts) + (f" (TCG because {'; '.join(sorted(w for w in whys if w))})" if whys else "")
        return Probe(name, True, detail, "", needed)

    return _attempt(name, needed, body)


def probe_packetdrill() -> Probe:
    """Whether the real MPTCP packetdrill is here and usable (its engine for .pkt scripts)."""
    name, needed = "packetdrill", "the packetdrill engine of `mptcp-conformance pkt` (ours needs nothing)"

    def body() -> Probe:
        from conformance.packetdrill.engines import packetdrill_binary

        path, why = packetdrill_binary()
        if path is None:
            return Probe(name, False, "", why, needed)
        return Probe(name, True, path, "", needed)

    return _attempt(name, needed, body)


# --- running, caching, requiring --------------------------------------------------------------

# Order is the order of the report: the basics first, optional extras last.
_PROBES: list[tuple[str, Callable[[], Probe | list[Probe]]]] = [
    ("root", probe_root),
    ("kernel", probe_kernel),
    ("sysctl:net.mptcp", probe_mptcp_sysctls),
    ("socket:mptcp", probe_mptcp_socket),
    ("sockopt:mptcp_info", probe_mptcp_info),
    ("ip-mptcp", probe_ip_mptcp),
    ("qdisc:htb", lambda: probe_qdisc("htb")),
    ("qdisc:tbf", lambda: probe_qdisc("tbf")),
    ("qdisc:netem", lambda: probe_qdisc("netem")),
    ("iptables:TCPOPTSTRIP", lambda: probe_iptables_target("TCPOPTSTRIP")),
    ("iptables:NFQUEUE", lambda: probe_iptables_target("NFQUEUE")),
    ("nft", probe_nft),
    ("tshark", lambda: probe_tool("tshark", ["--version"])),
    ("tcpdump", lambda: probe_tool("tcpdump", ["--version"])),
    ("mnexec", lambda: probe_tool("mnexec", ["-v"])),
    ("ethtool", lambda: probe_tool("ethtool", ["--version"])),
    ("dev:net/tun", lambda: probe_device("/dev/net/tun")),
    ("dev:kvm", lambda: probe_device("/dev/kvm")),
    ("guest:accelerator", probe_guest_accelerator),
    ("packetdrill", lambda: probe_packetdrill()),
]


def _run_entry(name: str, fn: Callable[[], Probe | list[Probe]]) -> list[Probe]:
    try:
        result = fn()
    except Exception as exc:
        return [Probe(name, False, "", f"the {name} probe itself failed ({type(exc).__name__}: {exc})", "")]
    return result if isinstance(result, list) else [result]


def run_all() -> list[Probe]:
    """Run every probe now (no cache); never raises."""
    return [p for name, fn in _PROBES for p in _run_entry(name, fn)]


def probe_names() -> list[str]:
    """The names `probe()` accepts (sysctl probes: any `sysctl:net.mptcp.<knob>`)."""
    return [name for name, _ in _PROBES]


@functools.cache
def _sysctl_probes() -> tuple[Probe, ...]:
    return tuple(probe_mptcp_sysctls())


@functools.cache
def probe(name: str) -> Probe:
    """The result of probe `name`, run once per process. Unknown names raise ValueError."""
    if name.startswith("sysctl:net.mptcp"):
        found = {p.name: p for p in _sysctl_probes()}
        if name in found:
            return found[name]
        if "sysctl:net.mptcp" in found:  # the directory itself is missing, or the probe crashed
            return Probe(name, False, "", found["sysctl:net.mptcp"].reason, "")
        knob = name.removeprefix("sysctl:")
        return Probe(name, False, "", f"{knob} does not exist on this kernel: cases that set it cannot run",
                     _SYSCTL_NEEDS.get(knob.removeprefix("net.mptcp."), "cases that set this knob"))
    for entry_name, fn in _PROBES:
        if entry_name == name:
            return _run_entry(name, fn)[0]
    raise ValueError(f"unknown doctor probe {name!r}; known: {', '.join(probe_names())}")


def require(*names: str) -> None:
    """Raise CapabilityMissing naming every capability in `names` this machine lacks."""
    missing = [p for p in (probe(n) for n in names) if not p.ok]
    if missing:
        raise CapabilityMissing("; ".join(f"{p.name}: {p.reason}" for p in missing))


# --- output ------------------------------------------------------------------------------------

def essential_ok(probes: list[Probe]) -> bool:
    """True when no essential probe failed (an essential probe that was not run counts as failed)."""
    by_name = {p.name: p for p in probes}
    return all(n in by_name and by_name[n].ok for n in ESSENTIAL)


def report_json(probes: list[Probe]) -> dict:
    return {
        "ok": essential_ok(probes),
        "essential": list(ESSENTIAL),
        "missing": [p.name for p in probes if not p.ok],
        "probes": [{**asdict(p), "essential": p.name in ESSENTIAL} for p in probes],
    }


def render_table(probes: list[Probe], console: Console) -> None:
    # Ratios rather than natural widths: long sysctl names and tool messages would otherwise
    # squeeze the reason column to a few characters on an 80-column terminal.
    table = Table(title="mptcp-conformance doctor", expand=True)
    table.add_column("capability", ratio=3, overflow="fold")
    table.add_column("status", no_wrap=True, min_width=7)
    table.add_column("detail", ratio=3)
    table.add_column("reason / needed for", ratio=5)
    for p in probes:
        if p.ok:
            status = Text("ok", style="green")
            why = Text(p.needed_for, style="dim")
        else:
            status = Text("missing", style="bold red" if p.name in ESSENTIAL else "yellow")
            why = Text(p.reason)
        # Text, not markup strings: tool errors may contain [brackets] that rich would eat.
        table.add_row(Text(p.name), status, Text(p.detail), why)
    console.print(table)


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = _OneLineParser(prog="mptcp-conformance doctor",
                            description="Check what this machine can do for the conformance suite.")
    parser.add_argument("--json", action="store_true", help="print the probes as JSON on stdout")
    args = parser.parse_args(argv)
    probes = run_all()
    ok = essential_ok(probes)
    if args.json:
        json.dump(report_json(probes), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0 if ok else 1
    console = Console()
    render_table(probes, console)
    failed = [p.name for p in probes if not p.ok and p.name in ESSENTIAL]
    optional = [p.name for p in probes if not p.ok and p.name not in ESSENTIAL]
    if failed:
        console.print(Text(f"essential capabilities missing: {', '.join(failed)}", style="bold red"))
    else:
        console.print(Text("all essential capabilities present", style="green"))
    if optional:
        console.print(Text(f"optional capabilities missing (their cases are skipped): {', '.join(optional)}",
                           style="yellow"))
    return 0 if ok else 1
