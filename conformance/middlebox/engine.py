"""Installing a profile into routers' namespaces, reading back what it did, removing it.

`attach()` installs a profile's plan (rules.py) on each router with iptables/ip6tables/nft run
inside the router's namespace, checks right away that every rule is in place, and registers the
removal on the caller's Cleanup stack before the first rule goes in, so a failure, a Ctrl-C or
SIGTERM half-way still removes it. The handle reads the rules' packet counters (`hits()`): a
middlebox whose rules never matched "did not take effect", and a case can say so."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from conformance import doctor
from conformance.errors import CommandError, HarnessError
from conformance.middlebox.catalogue import profile as named_profile
from conformance.middlebox.placement import Placement, place
from conformance.middlebox.placement import routers as topology_routers
from conformance.middlebox.profile import HELPED, Profile
from conformance.middlebox.rules import FAMILIES, SAVE_TOOLS, Plan, plan, proxy_port, queue
from conformance.net.cleanup import Cleanup
from conformance.net.names import run_prefix
from conformance.proc import NETNS_DIR, Background, run
from conformance.verdict import Expect

# Probes of the doctor a profile's action cannot do without (the others are plain xt modules).
NEEDS = {"strip-option": ("iptables:TCPOPTSTRIP",), "rewrite-payload": ("nft",),
         **{kind: ("iptables:NFQUEUE",) for kind in ("rewrite-seq", "resegment", "coalesce", "alg")}}
# (tcp-proxy needs only the nat table's REDIRECT, which every iptables has.)
_numbers = itertools.count(1)
_COUNTED = re.compile(r"^\[(\d+):(\d+)\] -A (\S+) ")


def save(netns: str, tool: str, table: str) -> str:
    """`iptables-save -c -t <table>` (or ip6tables-save) inside `netns`."""
    return run([SAVE_TOOLS[tool], "-c", "-t", table], netns=netns).stdout


def chain_counters(text: str, chain: str) -> list[int]:
    """Packet counters of the rules of `chain`, in order, from `iptables-save -c` output."""
    out = []
    for line in text.splitlines():
        m = _COUNTED.match(line)
        if m and m.group(3) == chain:
            out.append(int(m.group(1)))
    return out


def nft_counter(netns: str, family: str, name: str) -> int:
    """Sum of the counters of nft table `name`."""
    data = json.loads(run(["nft", "-j", "list", "table", family, name], netns=netns).stdout)
    total = 0
    for item in data.get("nftables", []):
        for expr in item.get("rule", {}).get("expr", []):
            if "counter" in expr:
                total += int(expr["counter"]["packets"])
    return total


@dataclass
class RouterPart:
    """A middlebox's state on one router."""

    placement: Placement
    netns: str
    plan: Plan
    installed: bool = False
    final: dict[str, int] | None = None  # counters read just before removal
    helper: Background | None = None  # the NFQUEUE helper of a helped action (rewriter.py)
    helper_stats: Path | None = None  # where it writes what it did when it stops
    helper_final: dict | None = None  # what it wrote, read once it stopped
    helper_scratch: Path | None = None  # a temporary folder for its stats (no artefact folder given)

    @property
    def router(self) -> str:
        return self.placement.router

    def counters(self) -> dict[str, int]:
        """Packets each of the plan's counting rules matched, keyed `tool/table` or `nft/<table>`."""
        if self.final is not None:
            return dict(self.final)
        out: dict[str, int] = {}
        for tool, table in self.plan.chains:
            counting = [r.counts for r in self.plan.rules_in(tool, table)]
            values = chain_counters(save(self.netns, tool, table), self.plan.chain)
            if len(values) != len(counting):
                raise HarnessError(f"middlebox {self.plan.chain} on {self.router}: {tool} table {table} holds "
                                   f"{len(values)} of its {len(counting)} rules")
            out[f"{tool}/{table}"] = sum(v for v, c in zip(values, counting, strict=True) if c)
        for t in self.plan.nft:
            out[f"nft/{t.name}"] = nft_counter(self.netns, t.family, t.name)
        return out

    def verify_installed(self) -> None:
        """Every rule and jump of the plan is in place (read back, not assumed)."""
        for tool, table in self.plan.chains:
            text = save(self.netns, tool, table)
            rules = chain_counters(text, self.plan.chain)
            wanted = len(self.plan.rules_in(tool, table))
            jumps = sum(1 for line in text.splitlines() if line.rstrip().endswith(f"-j {self.plan.chain}"))
            wanted_jumps = sum(1 for j in self.plan.jumps if j.tool == tool and j.table == table)
            if len(rules) != wanted or jumps != wanted_jumps:
                raise HarnessError(f"middlebox {self.plan.chain} on {self.router}: after setup {tool} table "
                                   f"{table} has {len(rules)}/{wanted} rules and {jumps}/{wanted_jumps} jumps")
        for t in self.plan.nft:
            nft_counter(self.netns, t.family, t.name)  # raises if the table is missing

    def listing(self) -> str:
        """Our rules with their counters, as the tools print them (the middlebox's evidence)."""
        parts = []
        for tool, table in self.plan.chains:
            lines = [ln for ln in save(self.netns, tool, table).splitlines() if self.plan.chain in ln]
            parts.append(f"# {SAVE_TOOLS[tool]} -c -t {table} (our lines)\n" + "\n".join(lines))
        for t in self.plan.nft:
            parts.append(f"# nft list table {t.family} {t.name}\n"
                         + run(["nft", "list", "table", t.family, t.name], netns=self.netns).stdout)
        return "\n".join(parts) + "\n"

    def remove(self, evidence: Path | None = None) -> None:
        """Remove everything the plan installed (what is already gone is fine). When the router's
        namespace is gone, so is everything in it."""
        if not self.installed:
            return
        if not (NETNS_DIR / self.netns).exists():
            self.installed = False
            self._stop_helper(evidence)
            return
        try:
            self.final = self.counters()
            if evidence is not None:
                evidence.write_text(self.listing())
        except (HarnessError, OSError):
            pass  # a half-installed plan: its counters are not all there; remove what is
        failures = []
        for argv in self.plan.removal():
            cp = run(argv, netns=self.netns, check=False)
            if cp.returncode != 0 and not _already_gone(cp.stderr):
                failures.append(f"{' '.join(argv)}: {cp.stderr.strip().splitlines()[-1:]}")
        self.installed = False
        self._stop_helper(evidence)
        left = self.leftovers()
        if failures or left:
            raise HarnessError(f"removing middlebox {self.plan.chain} from {self.router} failed: "
                               + "; ".join(failures + [f"still there: {x}" for x in left]))

    def start_helper(self, profile: Profile, number: int, folder: Path | None) -> None:
        """The NFQUEUE helper, up and bound before any rule queues a segment to it."""
        if folder is None:
            folder = self.helper_scratch = Path(tempfile.mkdtemp(prefix=f"{run_prefix()}-mb-"))
        stats = folder / f"middlebox-{number}-{profile.name}-{self.router}-helper.json"
        action = profile.action
        if action.kind == "tcp-proxy":
            argv = ["conformance.middlebox.proxy", "--port", str(proxy_port(number))]
        elif action.kind == "alg":
            argv = ["conformance.middlebox.rewriter", "--queue", str(queue(number)), "alg", str(action.cut),
                    "--nth", str(action.nth), "--at", str(action.at)]
        else:
            value = {"rewrite-seq": "offset", "resegment": "size", "coalesce": "limit"}[action.kind]
            value = getattr(action, value)
            argv = ["conformance.middlebox.rewriter", "--queue", str(queue(number)), action.kind, str(value)]
        self.helper_stats = stats
        self.helper = Background([sys.executable, "-m", *argv, "--stats", str(stats)],
                                 netns=self.netns, stdout=stats.with_suffix(".out"),
                                 stderr=stats.with_suffix(".err"))
        self.helper.wait_for_output("ready", f"middlebox helper {action.kind} on {self.router}")

    def _stop_helper(self, evidence: Path | None) -> None:
        """Stop the helper (after the rules that fed it are gone) and keep what it reports."""
        if self.helper is None:
            return
        self.helper.stop()
        self.helper = None
        if self.helper_stats is not None and self.helper_stats.exists():
            text = self.helper_stats.read_text()
            self.helper_final = json.loads(text)
            if evidence is not None:
                with evidence.open("a") as f:
                    f.write(f"# helper ({self.helper_stats.name})\n{text}\n")
        if self.helper_scratch is not None:
            shutil.rmtree(self.helper_scratch, ignore_errors=True)
            self.helper_scratch = None

    def leftovers(self) -> list[str]:
        """Anything of this plan still in the router (checked after removal)."""
        left = []
        for tool, table in self.plan.chains:
            if self.plan.chain in save(self.netns, tool, table):
                left.append(f"{tool} table {table} chain {self.plan.chain}")
        if self.plan.nft:
            tables = run(["nft", "list", "tables"], netns=self.netns).stdout
            left += [f"nft table {t.name}" for t in self.plan.nft if f" {t.name}\n" in tables + "\n"]
        return left


def _already_gone(stderr: str) -> bool:
    text = stderr.lower()
    return any(s in text for s in ("does not exist", "no chain/target/match", "bad rule", "no such file",
                                   "couldn't load target", "no such process"))


@dataclass(frozen=True)
class Effect:
    profile: str
    hits: int
    where: str

    @property
    def took_effect(self) -> bool:
        return self.hits > 0

    def __str__(self) -> str:
        if self.took_effect:
            return f"{self.profile} on {self.where}: {self.hits} packet(s) matched"
        return f"{self.profile} on {self.where} did not take effect: its rules never matched"


@dataclass
class Middlebox:
    """A profile attached to one or more routers; `hits()` reads its counters now."""

    profile: Profile
    number: int
    parts: list[RouterPart] = field(default_factory=list)

    @property
    def routers(self) -> list[str]:
        return [p.router for p in self.parts]

    @property
    def where(self) -> str:
        return f"{', '.join(self.routers)} ({self.profile.direction})"

    def counters(self) -> dict[str, dict[str, int]]:
        return {p.router: p.counters() for p in self.parts}

    def hits(self) -> int:
        """Packets the middlebox acted on, over all its routers and families."""
        return sum(sum(c.values()) for c in self.counters().values())

    def helper_reports(self) -> dict[str, dict]:
        """Per router, what an NFQUEUE helper reported (seen, changed, added, offsets) once the
        middlebox was removed; {} for rule-only actions."""
        return {p.router: p.helper_final for p in self.parts if p.helper_final is not None}

    def effect(self) -> Effect:
        return Effect(self.profile.name, self.hits(), self.where)

    def expect_acted(self, e: Expect, *, at_least: int = 1, at_most: int | None = None,
                     rid: str | None = None) -> bool:
        """A check that the middlebox acted on between `at_least` and `at_most` packets."""
        effect = self.effect()
        ok = at_least <= effect.hits and (at_most is None or effect.hits <= at_most)
        if at_most is None:
            want = f"{at_least} or more"
        else:
            want = f"{at_least}" if at_most == at_least else f"{at_least}..{at_most}"
        return e.that(ok, f"middlebox {self.profile.name} on {self.where} acted",
                      expected=f"{want} packet(s) matched", seen=effect, rid=rid)

    def remove(self, folder: Path | None = None) -> None:
        failures = []
        for part in reversed(self.parts):
            name = f"middlebox-{self.number}-{self.profile.name}-{part.router}.txt"
            evidence = folder / name if folder else None
            try:
                part.remove(evidence)
            except HarnessError as exc:
                failures.append(str(exc))
        if failures:
            raise HarnessError("; ".join(failures))

    def __str__(self) -> str:
        return f"middlebox {self.number} {self.profile.name} on {self.where}"


def resolve(profile: Profile | str, direction: str | None) -> Profile:
    chosen = named_profile(profile) if isinstance(profile, str) else profile
    if not isinstance(chosen, Profile):
        raise TypeError(f"profile {profile!r} is neither a Profile nor a profile name")
    return chosen.with_(direction=direction) if direction and direction != chosen.direction else chosen


def attach(profile: Profile | str, network, *, cleanup: Cleanup, router: str | list[str] = "r1",
           direction: str | None = None, folder: Path | None = None) -> Middlebox:
    """Install `profile` on `router` of the running `network` ("all": the router of every path)
    and register its removal on `cleanup`. `direction` overrides the profile's."""
    chosen = resolve(profile, direction)
    doctor.require(*NEEDS.get(chosen.action.kind, ()))
    topo = network.topo
    if router == "all":
        names = list(getattr(topo, "paths", []) or topology_routers(topo))
    else:
        names = [router] if isinstance(router, str) else list(router)
    families = FAMILIES[topo.family]
    box = Middlebox(chosen, next(_numbers))
    cleanup.defer(f"remove {box}", box.remove, folder)
    for name in names:
        placement = place(topo, name, topo.client, topo.server)
        part = RouterPart(placement, network.netns(name),
                          plan(chosen, placement, families, prefix=run_prefix(), number=box.number))
        box.parts.append(part)
        part.installed = True  # from the first command on, removal has something to do
        if chosen.action.kind in HELPED:
            part.start_helper(chosen, box.number, folder)
        for argv, stdin in part.plan.install():
            try:
                run(argv, netns=part.netns, input=stdin)
            except CommandError as exc:
                raise HarnessError(f"{box}: installing on {name} failed: {exc}") from None
        part.verify_installed()
    return box
