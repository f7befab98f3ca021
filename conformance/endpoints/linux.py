"""The Linux kernel's MPTCP as an endpoint: per-host configuration and the transfer programs.

Configuration goes through netlink (pyroute2's MPTCP path-manager family) and /proc/sys inside
the host's namespace; everything is undone with the namespace itself."""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass, field

from pyroute2 import MPTCP

from conformance.net.nodes import NetnsNode, write_sysctls
from conformance.proc import in_netns


class EndpointFlags(enum.IntFlag):
    """MPTCP_PM_ADDR_FLAG_* of include/uapi/linux/mptcp.h."""

    SIGNAL = 1 << 0
    SUBFLOW = 1 << 1
    BACKUP = 1 << 2
    FULLMESH = 1 << 3


@dataclass(frozen=True)
class PMEndpoint:
    """One in-kernel path-manager endpoint (`ip mptcp endpoint add ADDR [dev D] [port P] FLAGS`)."""

    addr: str
    flags: EndpointFlags
    dev: str | None = None
    id: int | None = None
    port: int | None = None


@dataclass
class MptcpConfig:
    """What one host's kernel is told before a case runs."""

    enabled: bool = True
    checksum: bool = False
    sysctls: dict[str, str] = field(default_factory=dict)
    subflows: int | None = None  # limits: max additional subflows
    add_addr_accepted: int | None = None  # limits: max ADD_ADDRs accepted
    endpoints: list[PMEndpoint] = field(default_factory=list)


def configure(node: NetnsNode, cfg: MptcpConfig) -> None:
    """Apply `cfg` inside node's namespace."""
    write_sysctls(node.netns, {"net.mptcp.enabled": "1" if cfg.enabled else "0",
                               "net.mptcp.checksum_enabled": "1" if cfg.checksum else "0", **cfg.sysctls})
    limits = {k: v for k, v in (("subflows", cfg.subflows), ("rcv_add_addrs", cfg.add_addr_accepted))
              if v is not None}
    if not limits and not cfg.endpoints:
        return
    with in_netns(node.netns):
        pm = MPTCP()
    try:
        if limits:
            pm.limits("set", **limits)
        for ep in cfg.endpoints:
            kw: dict = {"flags": int(ep.flags)}
            addr = ipaddress.ip_address(ep.addr)
            kw["addr4" if addr.version == 4 else "addr6"] = str(addr)
            if ep.id is not None:
                kw["id"] = ep.id
            if ep.port is not None:
                kw["port"] = ep.port
            if ep.dev is not None:
                # pyroute2 declares IF_IDX as raw bytes ("hex"); the kernel reads an s32.
                kw["if_idx"] = struct.pack("=i", node.ipr().link_lookup(ifname=ep.dev)[0])
            pm.endpoint("add", **kw)
    finally:
        pm.close()
        node.close_netlink()


def show_endpoints(node: NetnsNode) -> list[dict]:
    """The endpoints as the kernel reports them (for the artefact folder)."""
    with in_netns(node.netns):
        pm = MPTCP()
    try:
        out = []
        for msg in pm.endpoint("show"):
            addr = msg.get_attr("MPTCP_PM_ATTR_ADDR")
            out.append({k.removeprefix("MPTCP_PM_ADDR_ATTR_").lower(): v for k, v in addr["attrs"]})
        return out
    finally:
        pm.close()
