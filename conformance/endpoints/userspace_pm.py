"""Our driver of Linux's userspace path manager (net.mptcp.pm_type=1): the `linux-userspace-pm`
implementation of the matrix.

With the userspace PM the kernel makes no path decision of its own: it reports connection events
on the `mptcp_pm_events` generic-netlink group and waits for a daemon to announce addresses
(MPTCP_PM_CMD_ANNOUNCE) and open subflows (MPTCP_PM_CMD_SUBFLOW_CREATE). This module is that
daemon. It takes the same MptcpConfig a case gives the in-kernel PM and carries it out the way
the in-kernel PM would: a listener announces its `signal` endpoints once a connection is
established; a client opens a subflow from each `subflow` endpoint to the address it connected
to, and one to each address the peer announces, within the configured limits. What it does not
implement (fullmesh endpoints, say) is refused before the case runs: the case is then
"unsupported" for this implementation rather than failed.

Every event received and command sent goes to a JSON-lines log in the case's artefact folder.

pyroute2's MPTCP class speaks only the in-kernel PM's commands, so the message layouts for the
userspace PM's commands and events (include/uapi/linux/mptcp_pm.h) are declared here on
pyroute2's generic-netlink classes."""

from __future__ import annotations

import argparse
import ipaddress
import json
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST, genlmsg, nla
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic import GenericNetlinkSocket

FAMILY = "mptcp_pm"
EVENTS_GROUP = "mptcp_pm_events"
CMD_ANNOUNCE, CMD_REMOVE, CMD_SUBFLOW_CREATE, CMD_SUBFLOW_DESTROY = 8, 9, 10, 11
ADDR_FLAG_SIGNAL, ADDR_FLAG_SUBFLOW, ADDR_FLAG_BACKUP, ADDR_FLAG_FULLMESH = 1, 2, 4, 8

EVENTS = {1: "created", 2: "established", 3: "closed", 6: "announced", 7: "removed", 10: "sub_established",
          11: "sub_closed", 13: "sub_priority", 15: "listener_created", 16: "listener_closed"}


class _Addr(nla):
    prefix = "MPTCP_PM_ADDR_ATTR_"
    nla_map = (
        ("MPTCP_PM_ADDR_ATTR_UNSPEC", "none"),
        ("MPTCP_PM_ADDR_ATTR_FAMILY", "uint16"),
        ("MPTCP_PM_ADDR_ATTR_ID", "uint8"),
        ("MPTCP_PM_ADDR_ATTR_ADDR4", "ipaddr"),
        ("MPTCP_PM_ADDR_ATTR_ADDR6", "ipaddr"),
        ("MPTCP_PM_ADDR_ATTR_PORT", "uint16"),
        ("MPTCP_PM_ADDR_ATTR_FLAGS", "uint32"),
        ("MPTCP_PM_ADDR_ATTR_IF_IDX", "int32"),
    )


class PMCommand(genlmsg):
    """A command of the mptcp_pm family (MPTCP_PM_ATTR_* attributes)."""

    prefix = "MPTCP_PM_ATTR_"
    nla_map = (
        ("MPTCP_PM_ATTR_UNSPEC", "none"),
        ("MPTCP_PM_ATTR_ADDR", "pm_addr"),
        ("MPTCP_PM_ATTR_RCV_ADD_ADDRS", "uint32"),
        ("MPTCP_PM_ATTR_SUBFLOWS", "uint32"),
        ("MPTCP_PM_ATTR_TOKEN", "uint32"),
        ("MPTCP_PM_ATTR_LOC_ID", "uint8"),
        ("MPTCP_PM_ATTR_ADDR_REMOTE", "pm_addr"),
    )
    pm_addr = _Addr


class PMEvent(genlmsg):
    """An event of the mptcp_pm_events group (MPTCP_ATTR_* attributes; cmd is the event type)."""

    prefix = "MPTCP_ATTR_"
    nla_map = (
        ("MPTCP_ATTR_UNSPEC", "none"),
        ("MPTCP_ATTR_TOKEN", "uint32"),
        ("MPTCP_ATTR_FAMILY", "uint16"),
        ("MPTCP_ATTR_LOC_ID", "uint8"),
        ("MPTCP_ATTR_REM_ID", "uint8"),
        ("MPTCP_ATTR_SADDR4", "ipaddr"),
        ("MPTCP_ATTR_SADDR6", "ipaddr"),
        ("MPTCP_ATTR_DADDR4", "ipaddr"),
        ("MPTCP_ATTR_DADDR6", "ipaddr"),
        ("MPTCP_ATTR_SPORT", "be16"),
        ("MPTCP_ATTR_DPORT", "be16"),
        ("MPTCP_ATTR_BACKUP", "uint8"),
        ("MPTCP_ATTR_ERROR", "uint8"),
        ("MPTCP_ATTR_FLAGS", "uint16"),
        ("MPTCP_ATTR_TIMEOUT", "uint32"),
        ("MPTCP_ATTR_IF_IDX", "int32"),
        ("MPTCP_ATTR_RESET_REASON", "uint32"),
        ("MPTCP_ATTR_RESET_FLAGS", "uint32"),
        ("MPTCP_ATTR_SERVER_SIDE", "uint8"),
    )


def event_dict(msg: PMEvent) -> dict:
    """An event as plain data: {"event": name, "token": ..., "saddr": ..., ...}."""
    out: dict = {"event": EVENTS.get(msg["cmd"], str(msg["cmd"]))}
    for name, value in msg["attrs"]:
        key = name.removeprefix("MPTCP_ATTR_").lower()
        if key[:5] in ("saddr", "daddr"):
            key = key[:5]
        out[key] = value
    return out


@dataclass
class Policy:
    """What the daemon does, from a case's MptcpConfig (see policy_from_config)."""

    announce: list[dict] = field(default_factory=list)  # {"addr", "id", "port", "dev", "backup"}
    subflow: list[dict] = field(default_factory=list)  # {"addr", "id", "dev", "backup"}
    subflows: int = 2  # extra subflows per connection, like the in-kernel PM's default limit
    add_addr_accepted: int = 0  # announced addresses a client opens a subflow to


class Unsupported(ValueError):
    """The configuration asks for something this driver does not do."""


def policy_from_config(cfg) -> Policy:
    """The daemon's policy for `cfg` (conformance.endpoints.linux.MptcpConfig); Unsupported when
    the in-kernel behaviour asked for has no counterpart here."""
    from conformance.endpoints.linux import EndpointFlags

    policy = Policy()
    if cfg.subflows is not None:
        policy.subflows = cfg.subflows
    if cfg.add_addr_accepted is not None:
        policy.add_addr_accepted = cfg.add_addr_accepted
    next_id = 1
    for ep in cfg.endpoints:
        if ep.flags & EndpointFlags.FULLMESH:
            raise Unsupported("fullmesh endpoints are an in-kernel path-manager feature")
        if not ep.flags & (EndpointFlags.SIGNAL | EndpointFlags.SUBFLOW):
            continue  # an address the in-kernel PM only knows: nothing to do with it
        # Address ID 0 is the initial subflow's: the kernel refuses it for announced addresses.
        ident = ep.id if ep.id else next_id
        next_id = max(next_id, ident) + 1
        entry = {"addr": ep.addr, "id": ident, "dev": ep.dev, "backup": bool(ep.flags & EndpointFlags.BACKUP)}
        if ep.flags & EndpointFlags.SIGNAL:
            policy.announce.append(entry | {"port": ep.port})
        if ep.flags & EndpointFlags.SUBFLOW:
            policy.subflow.append(entry)
    return policy


class UserspacePM:
    """The commands of the userspace PM, in the current network namespace."""

    def __init__(self) -> None:
        self.sock = GenericNetlinkSocket()
        self.sock.bind(FAMILY, PMCommand)
        self.ipr = IPRoute()

    def close(self) -> None:
        self.sock.close()
        self.ipr.close()

    def _addr(self, addr: str, *, id: int | None = None, port: int | None = None, flags: int = 0,
              dev: str | None = None) -> dict:
        ip = ipaddress.ip_address(addr)
        attrs: list = [("MPTCP_PM_ADDR_ATTR_FAMILY", socket.AF_INET if ip.version == 4 else socket.AF_INET6),
                       ("MPTCP_PM_ADDR_ATTR_ADDR4" if ip.version == 4 else "MPTCP_PM_ADDR_ATTR_ADDR6", str(ip))]
        if id is not None:
            attrs.append(("MPTCP_PM_ADDR_ATTR_ID", id))
        if port:
            attrs.append(("MPTCP_PM_ADDR_ATTR_PORT", port))
        if flags:
            attrs.append(("MPTCP_PM_ADDR_ATTR_FLAGS", flags))
        if dev is not None:
            attrs.append(("MPTCP_PM_ADDR_ATTR_IF_IDX", self.ipr.link_lookup(ifname=dev)[0]))
        return {"attrs": attrs}

    def _request(self, cmd: int, attrs: list) -> None:
        msg = PMCommand()
        msg["cmd"], msg["version"], msg["attrs"] = cmd, 1, attrs
        self.sock.nlm_request(msg, msg_type=self.sock.prid, msg_flags=NLM_F_REQUEST | NLM_F_ACK)

    def announce(self, token: int, addr: str, id: int, *, port: int | None = None, dev: str | None = None,
                 backup: bool = False) -> None:
        flags = ADDR_FLAG_SIGNAL | (ADDR_FLAG_BACKUP if backup else 0)
        self._request(CMD_ANNOUNCE, [("MPTCP_PM_ATTR_TOKEN", token),
                                     ("MPTCP_PM_ATTR_ADDR", self._addr(addr, id=id, port=port, flags=flags,
                                                                       dev=dev))])

    def remove(self, token: int, id: int) -> None:
        self._request(CMD_REMOVE, [("MPTCP_PM_ATTR_TOKEN", token), ("MPTCP_PM_ATTR_LOC_ID", id)])

    def subflow_create(self, token: int, local: str, remote: str, port: int, *, id: int | None = None,
                       dev: str | None = None, backup: bool = False) -> None:
        flags = ADDR_FLAG_BACKUP if backup else 0
        self._request(CMD_SUBFLOW_CREATE, [("MPTCP_PM_ATTR_TOKEN", token),
                                           ("MPTCP_PM_ATTR_ADDR", self._addr(local, id=id, flags=flags, dev=dev)),
                                           ("MPTCP_PM_ATTR_ADDR_REMOTE", self._addr(remote, port=port))])

    def source_for(self, remote: str) -> str:
        """The source address the routing table picks towards `remote`."""
        route = self.ipr.route("get", dst=remote)[0]
        return route.get_attr("RTA_PREFSRC")


class Daemon:
    """Reacts to one namespace's MPTCP events according to a Policy."""

    def __init__(self, policy: Policy, log: Path) -> None:
        self.policy, self.log = policy, log.open("a")
        self.events = GenericNetlinkSocket()
        self.events.bind(FAMILY, PMEvent)
        self.events.add_membership(EVENTS_GROUP)
        self.pm = UserspacePM()
        self.extra: dict[int, int] = {}  # token -> subflows added beyond the first
        self.accepted: dict[int, int] = {}  # token -> announced addresses acted on
        self.ports: dict[int, int] = {}  # token -> the port the connection went to

    def record(self, what: str, **data) -> None:
        self.log.write(json.dumps({"t": round(time.time(), 6), what: data}, default=str) + "\n")
        self.log.flush()

    def command(self, what: str, call, *args, **kwargs) -> bool:
        try:
            call(*args, **kwargs)
        except NetlinkError as exc:
            self.record("command", cmd=what, args=[*args], kwargs=kwargs, error=f"{exc.code}: {exc}")
            return False
        self.record("command", cmd=what, args=[*args], kwargs=kwargs, ok=True)
        return True

    def run(self) -> None:
        print("ready", flush=True)  # the Lab waits for this: events are subscribed from here on
        while True:
            for msg in self.events.get():
                if msg.get("header", {}).get("type") != self.events.prid:
                    continue
                ev = event_dict(msg)
                self.record("event", **ev)
                self.handle(ev)

    def handle(self, ev: dict) -> None:
        token = ev.get("token")
        if ev["event"] == "established":
            self.extra.setdefault(token, 0)
            self.ports[token] = ev.get("dport", 0)
            for a in self.policy.announce:
                self.command("announce", self.pm.announce, token, a["addr"], a["id"], port=a.get("port"),
                             dev=a.get("dev"), backup=a["backup"])
            if not ev.get("server_side"):
                for s in self.policy.subflow:
                    self._subflow(token, s["addr"], ev["daddr"], ev["dport"], id=s["id"], dev=s.get("dev"),
                                  backup=s["backup"])
        elif ev["event"] == "announced" and not ev.get("server_side"):
            if self.accepted.get(token, 0) >= self.policy.add_addr_accepted:
                return
            self.accepted[token] = self.accepted.get(token, 0) + 1
            remote = ev["daddr"]
            # Like the in-kernel PM: from the address the routing table picks towards it.
            self._subflow(token, self.pm.source_for(remote), remote, ev.get("dport") or self.ports.get(token, 0))
        elif ev["event"] == "closed":
            for table in (self.extra, self.accepted, self.ports):
                table.pop(token, None)

    def _subflow(self, token: int, local: str, remote: str, port: int, **kw) -> None:
        if self.extra.get(token, 0) >= self.policy.subflows:
            self.record("skipped", why="subflow limit", token=token, remote=remote)
            return
        if self.command("subflow_create", self.pm.subflow_create, token, local, remote, port, **kw):
            self.extra[token] = self.extra.get(token, 0) + 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance.endpoints.userspace_pm",
                                     description="userspace MPTCP path manager daemon (one namespace)")
    parser.add_argument("--policy", required=True, help="Policy as JSON")
    parser.add_argument("--log", required=True, type=Path, help="JSON-lines log of events and commands")
    args = parser.parse_args(argv)
    try:
        policy = Policy(**json.loads(args.policy))
    except (ValueError, TypeError) as exc:
        print(f"--policy: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    Daemon(policy, args.log).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
