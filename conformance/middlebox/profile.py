"""Middlebox profiles as validated data: which segments to match, what to do to them, in which
direction, and from which packet of each subflow on.

A profile says nothing about iptables or nft (rules.py translates it) and needs no root. Bad data
fails at construction with one line naming the field: `ProfileError("profile 'x': match.segment
'syns' not one of syn, synack, third-ack, data, pure-ack, any")`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from conformance.errors import InputError

MPTCP_KIND = 30

# Which segments a profile acts on. The third ACK is the initiator's first segment after its SYN.
SEGMENTS = {
    "syn": "SYN without ACK",
    "synack": "SYN/ACK",
    "third-ack": "the third ACK of the handshake (the initiator's second segment)",
    "data": "segments carrying payload",
    "pure-ack": "ACKs without payload, SYN, FIN or RST",
    "any": "every TCP segment",
}
# c2s: from the client's side of the router to the server's side; s2c the reverse.
DIRECTIONS = ("c2s", "s2c", "both")
# Segments that only ever travel one way (for the check that a profile can match at all).
_ONE_WAY = {"syn": "c2s", "third-ack": "c2s", "synack": "s2c"}


class ProfileError(InputError):
    """A middlebox profile is malformed; the message names the profile and the field."""


def _int(value: Any, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProfileError(f"{where} {value!r} is not an integer")
    if not low <= value <= high:
        raise ProfileError(f"{where} {value} not in {low}..{high}")
    return value


def _choice(value: Any, where: str, allowed) -> str:
    if value not in allowed:
        raise ProfileError(f"{where} {value!r} not one of {', '.join(allowed)}")
    return value


@dataclass(frozen=True)
class Match:
    """Which segments: a kind of segment, only those carrying an MPTCP option (kind 30) if `mptcp`,
    and only the `nth` one of those the router sees (counted across the router's subflows)."""

    segment: str = "any"
    mptcp: bool = False
    nth: int | None = None

    def __post_init__(self) -> None:
        _choice(self.segment, "match.segment", SEGMENTS)
        if not isinstance(self.mptcp, bool):
            raise ProfileError(f"match.mptcp {self.mptcp!r} is not true or false")
        if self.nth is not None:
            _int(self.nth, "match.nth", 1, 1_000_000)


# -- actions ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StripOption:
    """Remove a TCP option (default MPTCP, kind 30) from the matched segments (TCPOPTSTRIP)."""

    kind: ClassVar[str] = "strip-option"
    option: int = MPTCP_KIND

    def __post_init__(self) -> None:
        _int(self.option, "action.option", 2, 255)


@dataclass(frozen=True)
class Drop:
    """Drop the matched segments (a firewall)."""

    kind: ClassVar[str] = "drop"


@dataclass(frozen=True)
class RewritePayload:
    """Flip bits of one payload byte (byte `offset` of the segment's payload, XOR `xor`): the TCP
    checksum stays right, an MPTCP DSS checksum over that data does not (nft raw payload set)."""

    kind: ClassVar[str] = "rewrite-payload"
    offset: int = 10
    xor: int = 0xFF

    def __post_init__(self) -> None:
        _int(self.offset, "action.offset", 0, 1400)
        _int(self.xor, "action.xor", 1, 255)


@dataclass(frozen=True)
class ClampMss:
    """Rewrite the MSS option of SYNs and SYN/ACKs (TCPMSS --set-mss)."""

    kind: ClassVar[str] = "clamp-mss"
    mss: int = 1200

    def __post_init__(self) -> None:
        _int(self.mss, "action.mss", 88, 65495)


@dataclass(frozen=True)
class Snat:
    """Source NAT of the client's connections to the router's own server-side address, with the
    source port rewritten into `ports` (a range the client's ephemeral ports are not in)."""

    kind: ClassVar[str] = "snat"
    ports: tuple[int, int] = (20000, 20999)

    def __post_init__(self) -> None:
        if not isinstance(self.ports, (tuple, list)) or len(self.ports) != 2:
            raise ProfileError(f"action.ports {self.ports!r} is not a [low, high] pair")
        low = _int(self.ports[0], "action.ports[0]", 1, 65535)
        high = _int(self.ports[1], "action.ports[1]", 1, 65535)
        if low > high:
            raise ProfileError(f"action.ports {low}-{high}: low port above high port")
        object.__setattr__(self, "ports", (low, high))


@dataclass(frozen=True)
class RewriteSeq:
    """A firewall randomising ISNs: the client's sequence numbers shifted by `offset` (0: a random
    offset per subflow), the server's ACKs and SACK blocks shifted back (NFQUEUE + scapy,
    middlebox/rewriter.py). Needs both directions."""

    kind: ClassVar[str] = "rewrite-seq"
    offset: int = 0

    def __post_init__(self) -> None:
        _int(self.offset, "action.offset", 0, 0xFFFFFFFF)


@dataclass(frozen=True)
class Resegment:
    """A resegmenting middlebox: data segments longer than `size` bytes are split into pieces of
    at most `size`, each carrying the original's TCP options (NFQUEUE + scapy, middlebox/rewriter.py)."""

    kind: ClassVar[str] = "resegment"
    size: int = 500

    def __post_init__(self) -> None:
        _int(self.size, "action.size", 1, 9000)


@dataclass(frozen=True)
class AlgRewrite:
    """An ALG that rewrites a string to a shorter one: `cut` bytes taken out at byte `at` of the
    client's `nth` data segment, and the sequence numbers after them shifted both ways so that
    TCP goes on unaware (as conntrack's helpers do); MPTCP's mappings no longer fit the data
    (NFQUEUE + scapy, middlebox/rewriter.py). Needs both directions."""

    kind: ClassVar[str] = "alg"
    cut: int = 4
    nth: int = 5
    at: int = 10

    def __post_init__(self) -> None:
        _int(self.cut, "action.cut", 1, 512)
        _int(self.nth, "action.nth", 1, 100_000)
        _int(self.at, "action.at", 0, 1400)


@dataclass(frozen=True)
class Coalesce:
    """A coalescing middlebox: a data segment waits a moment for the next of its flow and leaves
    merged with it if both fit in `limit` payload bytes, keeping only the first one's TCP options
    (NFQUEUE + scapy, middlebox/rewriter.py)."""

    kind: ClassVar[str] = "coalesce"
    limit: int = 1400

    def __post_init__(self) -> None:
        _int(self.limit, "action.limit", 2, 9000)


@dataclass(frozen=True)
class TcpProxy:
    """A TCP-terminating proxy: the client's connections are redirected to a process on the router
    that answers them as plain TCP and opens its own plain TCP connections to the server
    (middlebox/proxy.py)."""

    kind: ClassVar[str] = "tcp-proxy"


Action = (StripOption | Drop | RewritePayload | ClampMss | Snat | RewriteSeq | Resegment | Coalesce | AlgRewrite
          | TcpProxy)
ACTIONS: dict[str, type] = {cls.kind: cls for cls in (StripOption, Drop, RewritePayload, ClampMss, Snat,
                                                      RewriteSeq, Resegment, Coalesce, AlgRewrite, TcpProxy)}
# Actions a helper process on the router carries out.
HELPED = ("rewrite-seq", "resegment", "coalesce", "alg", "tcp-proxy")


# -- the profile --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Profile:
    """A declarative middlebox: `action` on segments that `match`, travelling `direction`, from
    packet `from_packet` of each subflow on (counted by the router's conntrack in that direction,
    both directions together for "both")."""

    name: str
    match: Match
    action: Action
    direction: str = "both"
    from_packet: int = 1
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or not all(
                c.isalnum() or c in "-_." for c in self.name):
            raise ProfileError(f"profile name {self.name!r} is not a non-empty word of letters, digits, -_.")
        try:
            self._check()
        except ProfileError as exc:
            raise ProfileError(f"profile {self.name!r}: {exc}") from None

    def _check(self) -> None:
        if not isinstance(self.match, Match):
            raise ProfileError(f"match {self.match!r} is not a Match")
        if not isinstance(self.action, tuple(ACTIONS.values())):
            raise ProfileError(f"action {self.action!r} not one of {', '.join(ACTIONS)}")
        _choice(self.direction, "direction", DIRECTIONS)
        _int(self.from_packet, "from_packet", 1, 1_000_000)
        seg, kind = self.match.segment, self.action.kind
        one_way = _ONE_WAY.get(seg)
        if one_way and self.direction not in (one_way, "both"):
            raise ProfileError(f"direction {self.direction!r}: a {seg} only travels {one_way}")
        if seg == "third-ack" and self.from_packet != 1:
            raise ProfileError("from_packet: the third ACK is always packet 2 of its direction")
        if kind == "rewrite-payload" and seg != "data":
            raise ProfileError(f"match.segment {seg!r}: rewrite-payload needs data segments")
        if kind == "clamp-mss" and seg not in ("syn", "synack", "any"):
            raise ProfileError(f"match.segment {seg!r}: clamp-mss acts on SYNs (syn, synack or any)")
        if kind in ("rewrite-seq", "alg") and (self.direction != "both" or seg != "any" or self.from_packet != 1):
            raise ProfileError(f"{kind} shifts whole subflows: segment any, direction both, from_packet 1")
        if kind in ("resegment", "coalesce") and seg not in ("data", "any"):
            raise ProfileError(f"match.segment {seg!r}: {kind} acts on data segments")
        if kind == "tcp-proxy" and (self.direction != "c2s" or seg != "any" or self.match.mptcp
                                    or self.match.nth or self.from_packet != 1):
            raise ProfileError("tcp-proxy takes whole client connections: segment any, direction c2s, "
                               "nothing else")
        if kind == "snat":
            if self.direction != "c2s":
                raise ProfileError(f"direction {self.direction!r}: snat translates client connections (c2s)")
            if seg != "any" or self.match.mptcp or self.match.nth or self.from_packet != 1:
                raise ProfileError("match: snat applies to whole connections (segment any, nothing else)")

    def with_(self, **changes: Any) -> Profile:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        action = {"kind": self.action.kind, **dataclasses.asdict(self.action)}
        if "ports" in action:
            action["ports"] = list(action["ports"])
        return {"name": self.name, "description": self.description,
                "match": dataclasses.asdict(self.match), "action": action,
                "direction": self.direction, "from_packet": self.from_packet}

    @classmethod
    def from_dict(cls, data: Any, source: str = "profile") -> Profile:
        """Build a profile from plain data (a TOML/YAML/JSON table); errors name `source` and the field."""
        try:
            return _from_dict(data)
        except ProfileError as exc:
            raise ProfileError(f"{source}: {exc}") from None


_PROFILE_KEYS = ("name", "description", "match", "action", "direction", "from_packet")


def _known(data: Any, where: str, keys) -> dict:
    if not isinstance(data, dict):
        raise ProfileError(f"{where} {data!r} is not a table")
    unknown = sorted(set(data) - set(keys))
    if unknown:
        raise ProfileError(f"{where}.{unknown[0]}: unknown field (known: {', '.join(keys)})".lstrip("."))
    return data


def _from_dict(data: Any) -> Profile:
    _known(data, "", _PROFILE_KEYS)
    for key in ("name", "match", "action"):
        if key not in data:
            raise ProfileError(f"{key}: missing")
    name = data["name"]
    try:
        match = Match(**_known(data["match"], "match", [f.name for f in dataclasses.fields(Match)]))
        action_data = dict(_known(data["action"], "action", ["kind", *sorted(
            {f.name for cls in ACTIONS.values() for f in dataclasses.fields(cls)})]))
        kind = _choice(action_data.pop("kind", None), "action.kind", ACTIONS)
        cls = ACTIONS[kind]
        allowed = [f.name for f in dataclasses.fields(cls)]
        _known(action_data, "action", ["kind", *allowed])
        if "ports" in action_data and isinstance(action_data["ports"], list):
            action_data["ports"] = tuple(action_data["ports"])
        action = cls(**action_data)
    except ProfileError as exc:
        raise ProfileError(f"profile {name!r}: {exc}") from None
    description = data.get("description", "")
    if not isinstance(description, str):
        raise ProfileError(f"profile {name!r}: description {description!r} is not a string")
    return Profile(name=name, match=match, action=action, direction=data.get("direction", "both"),
                   from_packet=data.get("from_packet", 1), description=description)
