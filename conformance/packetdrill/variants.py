"""The three address families a script runs in, with the addresses the MPTCP community's runner
gives packetdrill (so scripts and their helper shell commands see the same values either engine)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

NAMES = ("ipv4", "ipv4-mapped-ipv6", "ipv6")
DEVICE = "tun0"
PORT = 8080  # packetdrill's bind and connect port


@dataclass(frozen=True)
class Variant:
    name: str
    local_ip: str  # the kernel under test
    remote_ip: str  # the script's side
    prefix: int  # of the remote network, routed through the device
    netmask_ip: str
    gateway_ip: str
    mtu: int | None = None

    @property
    def wire_v6(self) -> bool:
        """IPv6 on the wire (ipv4-mapped-ipv6 sockets still send IPv4)."""
        return self.name == "ipv6"

    @property
    def socket_v6(self) -> bool:
        return self.name != "ipv4"

    def sockaddr(self, ip: str) -> str:
        return f"::ffff:{ip}" if self.name == "ipv4-mapped-ipv6" else ip

    def local_cidr(self) -> str:
        if self.wire_v6:
            return f"{ipaddress.ip_address(self.local_ip)}/48"
        mask = ipaddress.ip_network(f"0.0.0.0/{self.netmask_ip}").prefixlen
        return f"{self.local_ip}/{mask}"

    def packetdrill_args(self) -> list[str]:
        """The command-line arguments upstream's runner passes for this variant."""
        if self.wire_v6:
            return ["--ip_version=ipv6", f"--mtu={self.mtu}", f"--local_ip={self.local_ip}",
                    f"--gateway_ip={self.gateway_ip}", f"--remote_ip={self.remote_ip}/{self.prefix}"]
        return [f"--ip_version={'ipv4' if self.name == 'ipv4' else 'ipv4-mapped-ipv6'}",
                f"--local_ip={self.local_ip}", f"--gateway_ip={self.gateway_ip}",
                f"--netmask_ip={self.netmask_ip}", f"--remote_ip={self.remote_ip}/{self.prefix}"]

    def environment(self, tolerance_usecs: int) -> dict[str, str]:
        """What packetdrill exports to a script's shell commands (OPT_<option>)."""
        return {"OPT_IP_VERSION": self.name, "OPT_LOCAL_IP": self.local_ip, "OPT_REMOTE_IP": self.remote_ip,
                "OPT_GATEWAY_IP": self.gateway_ip, "OPT_NETMASK_IP": self.netmask_ip,
                "OPT_LOCAL_DEV": DEVICE, "OPT_TOLERANCE_USECS": str(tolerance_usecs),
                "OPT_BIND_PORT": str(PORT), "OPT_CONNECT_PORT": str(PORT)}


VARIANTS = {
    "ipv4": Variant("ipv4", "192.168.0.2", "192.0.2.1", 24, "255.255.0.0", "192.168.0.1"),
    "ipv4-mapped-ipv6": Variant("ipv4-mapped-ipv6", "192.168.0.2", "192.0.2.1", 24, "255.255.0.0",
                                "192.168.0.1"),
    "ipv6": Variant("ipv6", "fd3d:fa7b:d17d::0", "2001:db8::1", 32, "ffff:ffff:ffff:ffff::",
                    "fd3d:fa7b:d17d:8888::0", mtu=1520),
}

_V4_ONLY = re.compile(r"v4\.pkt$")
_V6_ONLY = re.compile(r"v6\.pkt$")


def for_script(path: str | Path, wanted: str = "all") -> list[str]:
    """The variants a script runs in: `*v4.pkt` as ipv4 and ipv4-mapped-ipv6, `*v6.pkt` as ipv6,
    others in all three (upstream's rule), narrowed to `wanted` ("all" or one name)."""
    name = Path(path).name
    if _V4_ONLY.search(name):
        names = ["ipv4", "ipv4-mapped-ipv6"]
    elif _V6_ONLY.search(name):
        names = ["ipv6"]
    else:
        names = list(NAMES)
    return names if wanted == "all" else [n for n in names if n == wanted]
