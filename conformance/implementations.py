"""The implementations a run can put in the client and server roles.

Each has a name (the matrix axis, ci/matrix.yaml), a kind for results.json, and the way a case's
MptcpConfig is carried out on a host that plays it:

- `linux`: this machine's kernel with its in-kernel path manager (`ip mptcp endpoint`, limits);
- `linux-userspace-pm`: the same kernel with net.mptcp.pm_type=1, its paths decided by our
  daemon (conformance.endpoints.userspace_pm) from the same configuration.

A description is read when the run ends, from the kernel itself, so that a report says what was
tested, not what was meant to be."""

from __future__ import annotations

import json
import platform
import re
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from conformance.endpoints import linux
from conformance.endpoints.userspace_pm import Policy, Unsupported, policy_from_config

if TYPE_CHECKING:
    from conformance.lab import Lab

_SYSCTLS = ("enabled", "pm_type", "checksum_enabled", "allow_join_initial_addr_port", "add_addr_timeout")
_PM_TYPES = {"0": "in-kernel", "1": "userspace"}
DEFAULT = "linux"


class ImplementationUnsupported(Exception):
    """A case asks an implementation for something it does not do: the case's outcome is
    "unsupported" for it, neither a failure nor a skip."""


@dataclass(frozen=True)
class Implementation:
    name: str
    kind: str  # kernel | userspace | vm
    summary: str
    path_manager: str
    # (lab, node, cfg): make `node` carry out `cfg`; raises ImplementationUnsupported.
    apply: Callable[[Lab, str, linux.MptcpConfig], None]
    needs_setup: bool = False  # hosts the case leaves unconfigured still need apply(MptcpConfig())
    # Whose known deviations (deviations.yaml) it shares: the same kernel's, for another PM.
    shares_deviations_of: str | None = None
    guest: str | None = None  # kind vm: the Debian kernel version the guest boots

    @property
    def deviation_keys(self) -> tuple[str, ...]:
        return (self.name,) + ((self.shares_deviations_of,) if self.shares_deviations_of else ())


def _in_kernel(lab: Lab, node: str, cfg: linux.MptcpConfig) -> None:
    linux.configure(lab.net[node], cfg)


def _userspace(lab: Lab, node: str, cfg: linux.MptcpConfig) -> None:
    from conformance.proc import Background

    try:
        policy: Policy = policy_from_config(cfg)
    except Unsupported as exc:
        raise ImplementationUnsupported(f"linux-userspace-pm on {node}: {exc}") from None
    # The kernel takes no path decision of its own; limits and endpoints are the daemon's.
    linux.configure(lab.net[node], replace(cfg, sysctls={**cfg.sysctls, "net.mptcp.pm_type": "1"},
                                           subflows=None, add_addr_accepted=None, endpoints=[]))
    old = lab.daemons.pop(node, None)
    if old is not None:
        old.stop()
    log = lab.folder / f"userspace-pm-{node}.jsonl"
    (lab.folder / f"userspace-pm-{node}-policy.json").write_text(json.dumps(asdict(policy), indent=2))
    daemon = Background([sys.executable, "-m", "conformance.endpoints.userspace_pm", "--policy",
                         json.dumps(asdict(policy)), "--log", str(log)], netns=lab.net.netns(node),
                        stdout=lab.folder / f"userspace-pm-{node}.out",
                        stderr=lab.folder / f"userspace-pm-{node}.err")
    lab.cleanup.defer(f"stop the userspace PM daemon on {node}", daemon.stop)
    daemon.wait_for_output("ready", f"userspace PM daemon on {node}")
    lab.daemons[node] = daemon


def _in_guest(lab: Lab, node: str, cfg: linux.MptcpConfig) -> None:
    from conformance.endpoints.guest import endpoint

    try:
        endpoint.configure(lab.seats[node], cfg)
    except endpoint.Unsupported as exc:
        raise ImplementationUnsupported(f"{lab.implementation(node).name} on {node}: {exc}") from None


# Any installable Debian kernel, by version: linux-6.1-kvm, linux-6.12-kvm, linux-6.1.0-52-kvm.
_GUEST_NAME = re.compile(r"linux-(\d+\.\d+[0-9a-z.+~-]*?)-kvm")


def _guest(name: str, version: str) -> Implementation:
    # Another generation of the same implementation: Linux's known deviations are its own too
    # unless measured otherwise (a check it passes is a pass); what differs is listed under its name.
    return Implementation(name, "vm", f"Debian's Linux {version} kernel in a QEMU guest, in-kernel path manager",
                          "in-kernel", _in_guest, guest=version, shares_deviations_of="linux")


IMPLEMENTATIONS: dict[str, Implementation] = {
    "linux": Implementation("linux", "kernel", "the local kernel, in-kernel path manager", "in-kernel",
                            _in_kernel),
    "linux-userspace-pm": Implementation("linux-userspace-pm", "kernel",
                                         "the local kernel, userspace path manager driven by our daemon",
                                         "userspace", _userspace, needs_setup=True,
                                         shares_deviations_of="linux"),
}


def get(name: str) -> Implementation:
    if name in IMPLEMENTATIONS:
        return IMPLEMENTATIONS[name]
    m = _GUEST_NAME.fullmatch(name)
    if m:
        return _guest(name, m.group(1))
    raise ValueError(f"unknown implementation {name!r} (known: {', '.join(IMPLEMENTATIONS)}, "
                     "and linux-<Debian kernel version>-kvm, e.g. linux-6.1-kvm)")


def describe(name: str) -> dict:
    """{"kind", "version", "configuration"} of implementation `name`; an unknown name is described
    as such rather than guessed at."""
    try:
        impl = get(name)
    except ValueError:
        return {"kind": "unknown", "version": None, "configuration": {}}
    if impl.guest is not None:
        return _describe_guest(impl)
    config = {}
    for key in _SYSCTLS:  # a fresh namespace's defaults are the root namespace's at boot
        path = Path("/proc/sys/net/mptcp") / key
        try:
            config[key] = path.read_text().strip()
        except OSError:
            continue
    if "pm_type" in config:
        config["pm_type"] = "1" if impl.path_manager == "userspace" else config["pm_type"]
        config["path_manager"] = _PM_TYPES.get(config["pm_type"], config["pm_type"])
    if impl.path_manager == "userspace":
        config["path_manager_daemon"] = "conformance.endpoints.userspace_pm"
    config["note"] = "cases change these per namespace where they test them (MptcpConfig)"
    return {"kind": impl.kind, "version": platform.release(), "summary": impl.summary, "configuration": config}


def _describe_guest(impl: Implementation) -> dict:
    """A guest kernel as booted this session (or, if none was, as the cache holds it)."""
    from conformance.endpoints.guest import endpoint, kernels, vm

    guest = endpoint.booted().get(impl.guest)
    kernel = guest.kernel if guest else next((k for k in kernels.cached() if k.version == impl.guest), None)
    if kernel is None:
        return {"kind": "vm", "version": None, "summary": impl.summary, "configuration": {}}
    known = vm.accelerator_known(kernel.release) or {}
    config = {"package": f"{kernel.package} {kernel.package_version}", "deb_sha256": kernel.sha256,
              "accelerator": guest.accel if guest else known.get("accelerator"),
              "boot_to_ready_s": round(guest.boot_seconds, 2) if guest and guest.boot_seconds else None,
              "path_manager": "in-kernel"}
    return {"kind": "vm", "version": kernel.release, "summary": impl.summary, "configuration": config}
