"""pytest collection of packetdrill scripts: every `.pkt` under a `packetdrill/` folder of the
cases is one item per variant it runs in (`script.pkt::ipv4`, ...), naming the requirement IDs
its header declares (`// requirements: R3.1-01, ...`), so the compliance report counts them."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from conformance.packetdrill.engines import ENGINES, MODES
from conformance.packetdrill.script import Script, ScriptError, load
from conformance.packetdrill.variants import NAMES, for_script
from conformance.requirements.deviations import known_deviations


def add_options(group) -> None:
    group.addoption("--pkt-engine", default="python", choices=ENGINES,
                    help="engine for .pkt scripts (default python: our interpreter)")
    group.addoption("--pkt-mode", default="rfc", choices=MODES,
                    help="judge .pkt scripts byte for byte (strict) or by RFC 8684 only (rfc, default)")
    group.addoption("--pkt-variant", default="all", choices=(*NAMES, "all"),
                    help="address families of .pkt scripts (default: all the script's name allows)")


class PktFile(pytest.File):
    def collect(self) -> Iterator[pytest.Item]:
        try:
            script = load(self.path)
        except ScriptError as exc:
            raise self.CollectError(str(exc)) from None
        for variant in for_script(self.path, self.config.getoption("pkt_variant")):
            item = PktItem.from_parent(self, name=variant, script=script, variant=variant)
            if script.requirements:
                item.add_marker(pytest.mark.rfc8684(*script.requirements))
            yield item


class PktItem(pytest.Item):
    def __init__(self, *, script: Script, variant: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.script, self.variant = script, variant
        first = next((line for line in self.path.read_text().splitlines() if line.startswith("//")), "")
        self.obj = type("Doc", (), {"__doc__": first.lstrip("/ ") or f"packetdrill script {self.path.name}"})

    def runtest(self) -> None:
        from conformance import doctor
        from conformance.packetdrill import engines

        if os.geteuid() != 0:
            doctor.require("root")
        doctor.require("dev:net/tun")
        engine = self.config.getoption("pkt_engine")
        if engine == "packetdrill":
            doctor.require("packetdrill")
        result = engines.run(self.script, self.variant, engine, self.config.getoption("pkt_mode"))
        rids = list(self.script.requirements)
        # The kernel under test is the local one: a script that fails where every requirement it
        # names is a measured deviation of Linux (deviations.yaml) shows that deviation again.
        known = known_deviations().get("linux", {})
        deviation = result.verdict == "fail" and rids and all(r in known for r in rids)
        self.user_properties.append(("evidence", [result.details()]))
        self.user_properties.append(("checks", [
            {"requirement": rid, "ok": result.verdict == "pass", "text": result.details(),
             **({"deviation": f"linux: {known[rid]}"} if deviation else {})} for rid in rids]))
        if deviation:
            return
        if result.verdict == "skip":
            pytest.skip(result.message)
        if result.verdict == "error":
            from conformance.errors import HarnessError

            raise HarnessError(result.details())
        if result.verdict != "pass":
            raise PktFailed(result.details())

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, PktFailed):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.path, None, f"{self.path.name}::{self.variant}"


class PktFailed(AssertionError):
    """The kernel did not do what the script says (the message: script line, packet, difference)."""


def collect_file(parent: pytest.Collector, file_path) -> PktFile | None:
    if file_path.suffix == ".pkt" and "packetdrill" in file_path.parts:
        return PktFile.from_parent(parent, path=file_path)
    return None
