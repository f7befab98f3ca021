"""Kernel MIB counters of one network namespace (what `nstat` reads), and their deltas.

Counters are read from /proc/<pid>/net/{netstat,snmp} of a process inside the namespace, so no
process is spawned and nstat's shared history file is never involved."""

from __future__ import annotations

from pathlib import Path

PREFIXES = ("MPTcpExt", "TcpExt", "Tcp")


def read_counters(pid: int) -> dict[str, int]:
    """All `<Group><Name>` counters of the namespace of `pid`, e.g. MPTcpExtMPJoinSynRx."""
    values: dict[str, int] = {}
    for name in ("netstat", "snmp"):
        lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()
        for header, data in zip(lines[::2], lines[1::2], strict=False):
            group, *keys = header.split()
            _, *nums = data.split()
            group = group.rstrip(":")
            if group in PREFIXES:
                for key, num in zip(keys, nums, strict=False):
                    values[f"{group}{key}"] = int(num)
    return values


def delta(before: dict[str, int], after: dict[str, int], *, nonzero: bool = True) -> dict[str, int]:
    out = {k: after[k] - before.get(k, 0) for k in after}
    return {k: v for k, v in out.items() if v} if nonzero else out


def mptcp_only(counters: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in counters.items() if k.startswith("MPTcpExt")}
