"""The implementations a run can put in the client and server roles, described for results.json.

Only the kernel this machine runs is available yet (`linux`, its in-kernel path manager); guests
and our own stack join here as they land. A description is read when the run ends, from the
kernel itself, so that a report says what was tested, not what was meant to be."""

from __future__ import annotations

import platform
from pathlib import Path

_SYSCTLS = ("enabled", "pm_type", "checksum_enabled", "allow_join_initial_addr_port", "add_addr_timeout")
_PM_TYPES = {"0": "in-kernel", "1": "userspace"}


def describe(name: str) -> dict:
    """{"kind", "version", "configuration"} of implementation `name`; an unknown name is described
    as such rather than guessed at."""
    if name != "linux":
        return {"kind": "unknown", "version": None, "configuration": {}}
    config = {}
    for key in _SYSCTLS:  # a fresh namespace's defaults are the root namespace's at boot
        path = Path("/proc/sys/net/mptcp") / key
        try:
            config[key] = path.read_text().strip()
        except OSError:
            continue
    if "pm_type" in config:
        config["path_manager"] = _PM_TYPES.get(config["pm_type"], config["pm_type"])
    config["note"] = "cases change these per namespace where they test them (MptcpConfig)"
    return {"kind": "kernel", "version": platform.release(), "configuration": config}
