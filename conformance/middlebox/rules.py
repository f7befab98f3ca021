"""A profile translated into netfilter state for one router: iptables/ip6tables chains, rules and
the jumps into them, and (for payload rewriting) an nft table. Pure data, no root needed.

Every object carries the run prefix: chains `<prefix>-mb<k>` (with a comment naming the
profile), nft tables `<prefix>-mb<k>`. Matches the xt modules cannot express directly (payload
length) are classic BPF programs (bpf.py); "from packet N" is conntrack's packet count
(`-m connbytes`); "the Nth segment" is `-m statistic --mode nth`."""

from __future__ import annotations

from dataclasses import dataclass

from conformance.middlebox import bpf
from conformance.middlebox.placement import Placement
from conformance.middlebox.profile import MPTCP_KIND, Profile

TOOLS = {4: "iptables", 6: "ip6tables"}
SAVE_TOOLS = {"iptables": "iptables-save", "ip6tables": "ip6tables-save"}
FAMILIES = {"ipv4": (4,), "ipv6": (6,), "dual": (4, 6)}
NTH_EVERY = 1_000_000_000  # statistic nth cycles; this far apart it picks one packet per run
MARK_BASE = 0x4D420000  # "MB": a rewrite's selection mark, plus the middlebox number
PROXY_PORT_BASE = 47000  # + the middlebox number: clear of the endpoints' ports (5201 on)
QUEUE_BASE = 0x6D00  # the NFQUEUE numbers of helped middleboxes (rewriter.py)
_CONNBYTES_DIR = {"c2s": "original", "s2c": "reply", "both": "both"}
_FLAGS = {
    "syn": ["--tcp-flags", "SYN,ACK", "SYN"],
    "synack": ["--tcp-flags", "SYN,ACK", "SYN,ACK"],
    "third-ack": ["--tcp-flags", "SYN,ACK,FIN,RST", "ACK"],
    "pure-ack": ["--tcp-flags", "SYN,ACK,FIN,RST", "ACK"],
}


@dataclass(frozen=True)
class Rule:
    """`<tool> -t <table> -A <chain> <spec>`; `counts`: its packet counter counts the hits."""

    tool: str
    table: str
    chain: str
    spec: tuple[str, ...]
    counts: bool = True

    def argv(self, op: str = "-A") -> list[str]:
        return [self.tool, "-t", self.table, op, self.chain, *self.spec]


@dataclass(frozen=True)
class NftTable:
    family: str
    name: str
    script: str

    def argv_delete(self) -> list[str]:
        return ["nft", "delete", "table", self.family, self.name]


@dataclass(frozen=True)
class Plan:
    """What one middlebox installs on one router, in install order."""

    chain: str  # our chains' name (one per tool and table)
    chains: tuple[tuple[str, str], ...]  # (tool, table)
    rules: tuple[Rule, ...]  # rules inside our chains
    jumps: tuple[Rule, ...]  # rules in built-in chains that jump to ours
    nft: tuple[NftTable, ...] = ()

    def install(self) -> list[tuple[list[str], str | None]]:
        """(argv, stdin) to run in order."""
        cmds: list[tuple[list[str], str | None]] = [
            ([tool, "-t", table, "-N", self.chain], None) for tool, table in self.chains]
        cmds += [(r.argv(), None) for r in self.rules]
        cmds += [(["nft", "-f", "-"], t.script) for t in self.nft]
        cmds += [(j.argv(), None) for j in self.jumps]  # last: nothing jumps to a half-built chain
        return cmds

    def removal(self) -> list[list[str]]:
        """Argv lists undoing `install`, in order (jumps first)."""
        cmds = [j.argv("-D") for j in self.jumps]
        cmds += [t.argv_delete() for t in self.nft]
        for tool, table in self.chains:
            cmds += [[tool, "-t", table, "-F", self.chain], [tool, "-t", table, "-X", self.chain]]
        return cmds

    def rules_in(self, tool: str, table: str) -> list[Rule]:
        return [r for r in self.rules if r.tool == tool and r.table == table]


def match_spec(profile: Profile, family: int) -> list[str]:
    """The iptables match arguments selecting the profile's segments (direction excepted)."""
    m, seg = profile.match, profile.match.segment
    spec = ["-p", "tcp", *_FLAGS.get(seg, [])]
    if m.mptcp:
        spec += ["-m", "tcp", "--tcp-option", str(MPTCP_KIND)]
    if seg == "third-ack":
        spec += _connbytes("2:2", "original")
    elif profile.from_packet > 1:
        spec += _connbytes(f"{profile.from_packet}:", _CONNBYTES_DIR[profile.direction])
    payload = _payload_test(profile)
    if payload is not None:
        spec += ["-m", "bpf", "--bytecode", bpf.bytecode(bpf.payload_length(family, *payload))]
    if m.nth is not None:  # last: statistic counts only what every other match let through
        spec += ["-m", "statistic", "--mode", "nth", "--every", str(NTH_EVERY), "--packet", str(m.nth - 1)]
    return spec


def _payload_test(profile: Profile) -> tuple[str, int] | None:
    seg = profile.match.segment
    if seg == "data":
        # A rewrite changes two bytes' worth of bits (nft XORs 16-bit words): both must be there.
        return ("gt", profile.action.offset + 1) if profile.action.kind == "rewrite-payload" else ("gt", 0)
    if seg in ("pure-ack", "third-ack"):
        return ("eq", 0)
    return None


def _connbytes(span: str, direction: str) -> list[str]:
    return ["-m", "connbytes", "--connbytes", span, "--connbytes-dir", direction, "--connbytes-mode", "packets"]


def plan(profile: Profile, placement: Placement, families: tuple[int, ...], *, prefix: str,
         number: int) -> Plan:
    """The netfilter state for `profile` on `placement`'s router, middlebox number `number`."""
    chain = f"{prefix}-mb{number}"
    comment = ["-m", "comment", "--comment", f"{prefix} middlebox {number}: {profile.name}"]
    action = profile.action
    chains, rules, jumps, tables = [], [], [], []
    for family in families:
        tool = TOOLS[family]
        match = match_spec(profile, family)
        if action.kind == "snat":
            table, hook = "nat", "POSTROUTING"
            for side in placement.server:
                addr = placement.server_address(side, family)
                if addr is None:
                    continue
                low, high = action.ports
                to = f"{addr}:{low}-{high}" if family == 4 else f"[{addr}]:{low}-{high}"
                rules.append(Rule(tool, table, chain, ("-o", side.intf, *match, *comment,
                                                       "-j", "SNAT", "--to-source", to)))
            ingress: tuple[str, ...] = ()
        elif action.kind == "tcp-proxy":
            # Each client connection's first packet: nat takes it (and the rest follows it).
            table, hook = "nat", "PREROUTING"
            rules.append(Rule(tool, table, chain, (*match, *comment, "-j", "REDIRECT", "--to-ports",
                                                   str(proxy_port(number)))))
            ingress = placement.ingress("c2s")
        else:
            table, hook = ("filter" if action.kind == "drop" else "mangle"), "FORWARD"
            target = _target(profile, number)
            rules.append(Rule(tool, table, chain, (*match, *comment, *target),
                              counts=action.kind != "rewrite-payload"))
            ingress = placement.ingress(profile.direction)
        chains.append((tool, table))
        for intf in ingress or (None,):
            where = ("-i", intf) if intf else ()
            jumps.append(Rule(tool, table, hook, (*where, *comment, "-j", chain), counts=False))
    if action.kind == "rewrite-payload":
        tables.append(_rewrite_table(chain, number, action.offset, action.xor))
    return Plan(chain, tuple(chains), tuple(rules), tuple(jumps), tuple(tables))


def _target(profile: Profile, number: int) -> list[str]:
    action = profile.action
    if action.kind == "strip-option":
        return ["-j", "TCPOPTSTRIP", "--strip-options", str(action.option)]
    if action.kind == "drop":
        return ["-j", "DROP"]
    if action.kind == "clamp-mss":
        flags = ["--tcp-flags", "SYN,RST", "SYN"] if profile.match.segment == "any" else []
        return [*flags, "-j", "TCPMSS", "--set-mss", str(action.mss)]
    if action.kind == "rewrite-payload":
        return ["-j", "MARK", "--set-xmark", f"{mark(number):#x}/0xffffffff"]
    if action.kind in ("rewrite-seq", "resegment", "coalesce", "alg"):
        # No --queue-bypass: with its helper gone the segments are dropped, never passed unchanged.
        return ["-j", "NFQUEUE", "--queue-num", str(queue(number))]
    raise ValueError(f"no iptables target for action {action.kind!r}")


def proxy_port(number: int) -> int:
    """The router port the TCP-terminating proxy of middlebox `number` listens on."""
    return PROXY_PORT_BASE + (number & 0xFFF)


def queue(number: int) -> int:
    """The NFQUEUE number of middlebox `number` (clear of the delay lines' 0x4D50 on)."""
    return QUEUE_BASE + (number & 0xFFF)


def mark(number: int) -> int:
    return MARK_BASE | (number & 0xFFFF)


def _rewrite_table(name: str, number: int, offset: int, xor: int) -> NftTable:
    """nft changes the marked segment's payload byte `offset` (XOR `xor`) after iptables' mangle
    chains selected it (priority filter comes after mangle). nft 1.0.6 cannot XOR an 8-bit raw
    field with itself, so a 16-bit word is XORed with `xor` in its high byte."""
    bits = offset * 8
    script = (f'table inet {name} {{\n'
              f'  chain rewrite {{\n'
              f'    type filter hook forward priority filter; policy accept;\n'
              f'    meta mark {mark(number):#x} @ih,{bits},16 set @ih,{bits},16 ^ {xor << 8:#06x} counter '
              f'meta mark set 0x0\n'
              f'  }}\n'
              f'}}\n')
    return NftTable("inet", name, script)
