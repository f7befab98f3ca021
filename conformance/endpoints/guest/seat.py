"""A guest takes a topology host's place for one case.

The host's namespace stays (its interfaces are still the links the captures watch and the link
events act on) but becomes a wire: each of its interfaces is bridged to one of the guest's taps,
and everything layer 3 it had (addresses, routes, policy rules, and its interface names and MACs,
so that neighbours and case configuration see no difference) moves into a fresh namespace in the
guest. When the case ends, the taps go back to the guest's own namespace."""

from __future__ import annotations

import contextlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from conformance.endpoints.guest.vm import Guest, GuestError, oopses
from conformance.net.cleanup import Cleanup
from conformance.net.nodes import _BASE_SYSCTLS
from conformance.proc import run

# iproute2's, by path: busybox's shell runs its own `ip` applet for a bare `ip`, whatever PATH says.
IP = "/usr/sbin/ip"
_SKIP_ROUTE_TYPES = {"local", "broadcast", "multicast", "anycast"}
_DEFAULT_RULES = {0, 32766, 32767}


def _ip_json(args: list[str], netns: str) -> list[dict]:
    return json.loads(run(["ip", "-j", *args], netns=netns).stdout or "[]")


def _route_command(route: dict, family: int) -> str | None:
    """`ip route add` arguments recreating one route of the host, or None for one the kernel makes
    by itself (from an address) or that only exists for the host's own addresses."""
    if route.get("type", "unicast") in _SKIP_ROUTE_TYPES or route.get("protocol") == "kernel":
        return None
    dst = route.get("dst", "default")
    if family == 6 and (dst.startswith(("fe80", "ff")) or route.get("table") == "local"):
        return None
    words = ["-6" if family == 6 else "-4", "route", "add", dst]
    if route.get("gateway"):
        words += ["via", route["gateway"]]
    if route.get("dev"):
        words += ["dev", route["dev"]]
    if route.get("prefsrc"):
        words += ["src", route["prefsrc"]]
    if route.get("table") not in (None, "main"):
        words += ["table", str(route["table"])]
    if route.get("scope") not in (None, "global", "universe"):
        words += ["scope", str(route["scope"])]
    if route.get("metric") is not None:
        words += ["metric", str(route["metric"])]
    return " ".join(words)


def _rule_command(rule: dict, family: int) -> str | None:
    if rule.get("priority") in _DEFAULT_RULES:
        return None
    words = ["-6" if family == 6 else "-4", "rule", "add", "priority", str(rule["priority"])]
    if rule.get("src") and rule["src"] != "all":
        words += ["from", f"{rule['src']}/{rule['srclen']}" if "srclen" in rule else rule["src"]]
    if rule.get("dst") and rule["dst"] != "all":
        words += ["to", f"{rule['dst']}/{rule['dstlen']}" if "dstlen" in rule else rule["dst"]]
    words += ["table", str(rule.get("table", "main"))]
    return " ".join(words)


@dataclass
class Seat:
    """`guest` in `node`'s place (see the module docstring)."""

    guest: Guest
    node: str
    netns: str
    interfaces: list[str]
    console_from: int = 0
    commands: list[str] = field(default_factory=list)  # what was replayed in the guest (artefact)

    def console(self) -> str:
        """What the guest's console printed since the case took its seat."""
        text = self.guest.console_text()
        return text[self.console_from:]

    def broke(self) -> list[str]:
        """Oops, BUG and WARN lines the guest kernel printed during the case."""
        return oopses(self.console())

    def save(self, folder: Path) -> None:
        (folder / f"guest-{self.node}-console.log").write_text(self.console())
        (folder / f"guest-{self.node}-setup.sh").write_text("\n".join(self.commands) + "\n")


def take_place(guest: Guest, node: str, netns: str, interfaces: list[str], cleanup: Cleanup,
               sysctls: dict[str, str] | None = None) -> Seat:
    """Put `guest` in the place of `node` (namespace `netns`, its `interfaces` in port order), with
    the node's `sysctls` (a host's by default; a router's forward)."""
    if len(interfaces) > guest.nics:
        raise GuestError(f"{node} has {len(interfaces)} interfaces; guest {guest.name} has {guest.nics} NICs")
    seat = Seat(guest, node, netns, interfaces, console_from=guest.console_size())
    guest.fresh_namespace()
    # What the host has, read before anything changes (flushing its addresses drops its routes).
    links = {link["ifname"]: link for link in _ip_json(["link", "show"], netns)}
    addrs = {a["ifname"]: a.get("addr_info", []) for a in _ip_json(["addr", "show"], netns)}
    later = [f"{IP} {cmd}" for family in (4, 6) for rule in _ip_json([f"-{family}", "rule", "show"], netns)
             if (cmd := _rule_command(rule, family))]
    later += [f"{IP} {cmd}" for family in (4, 6)
              for route in _ip_json([f"-{family}", "route", "show", "table", "all"], netns)
              if (cmd := _route_command(route, family))]
    commands = [f"sysctl -qw {key.replace('/', '.')}={value}"
                for key, value in (sysctls or _BASE_SYSCTLS).items()]
    # The guest's NICs by the MAC they booted with (an earlier case may have renamed them).
    nics = {}
    for link in json.loads(guest.sh(f"{IP} -j link show")):
        nics[link.get("permaddr") or link.get("address")] = link["ifname"]
    moved: list[str] = []

    def give_back() -> None:
        # Before the host's namespace goes: a tap deleted with it would cut qemu's NIC for good.
        for tap in moved:
            with contextlib.suppress(Exception):
                run(["ip", "link", "set", tap, "nomaster"], netns=netns, check=False)
                run(["ip", "link", "set", tap, "netns", guest.home], netns=netns)

    cleanup.defer(f"give {guest.name}'s taps back", give_back)
    for i, intf in enumerate(interfaces):
        mac, tap, bridge = links[intf]["address"], guest.tap(i), f"vmbr{i}"
        nic = nics.get(guest.mac(i))
        if nic is None:
            raise GuestError(f"guest {guest.name}: no NIC with MAC {guest.mac(i)}")
        run(["ip", "link", "set", tap, "netns", netns], netns=guest.home)
        moved.append(tap)
        new_mac = ":".join(["02", *(f"{random.randrange(256):02x}" for _ in range(5))])
        for argv in (["link", "add", bridge, "type", "bridge"], ["link", "set", intf, "down"],
                     ["link", "set", intf, "address", new_mac], ["addr", "flush", "dev", intf],
                     ["link", "set", intf, "master", bridge], ["link", "set", tap, "master", bridge],
                     ["link", "set", intf, "up"], ["link", "set", tap, "up"], ["link", "set", bridge, "up"]):
            run(["ip", *argv], netns=netns)
        # The host keeps no address of its own on the wire: the guest answers for all of them.
        for dev in (bridge, intf, tap):
            run(["sysctl", "-qw", f"net.ipv6.conf.{dev}.disable_ipv6=1"], netns=netns, check=False)
        commands += [f"{IP} link set dev {nic} down", f"{IP} link set dev {nic} name {intf}",
                     f"{IP} link set dev {intf} address {mac}", f"{IP} link set dev {intf} up"]
        for a in addrs.get(intf, []):
            if a.get("scope") == "global":
                extra = " nodad" if a["family"] == "inet6" else ""
                commands.append(f"{IP} addr add {a['local']}/{a['prefixlen']} dev {intf}{extra}")
    seat.commands = commands + later
    guest.script(seat.commands)
    return seat
