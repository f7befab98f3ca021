"""What one run of a script found, whichever engine ran it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Outcome:
    """An engine's verdict on one run: pass, fail (the kernel did not do what the script says),
    error (the script or the engine could not run), skip (this engine cannot run the script)."""

    verdict: str
    line: int | None = None
    kind: str = ""  # mismatch | timing | timeout | syscall | command | script
    message: str = ""
    expected: str = ""  # the script's line
    seen: str = ""  # the kernel's packet, written as a script line would write it
    recent: list[str] = field(default_factory=list)  # the last packets either way
    tolerated: list[str] = field(default_factory=list)  # rfc mode: differences the RFC allows
    seconds: float = 0.0


@dataclass(kw_only=True)
class Result(Outcome):
    """An outcome with what was run: script, variant, engine, mode, the requirements it names."""

    script: str
    variant: str
    engine: str
    mode: str
    requirements: tuple[str, ...] = ()

    def headline(self) -> str:
        where = f"{self.script}:{self.line}" if self.line else self.script
        return f"{where} [{self.variant}, {self.engine}, {self.mode}]: {self.verdict}" + (
            f": {self.message}" if self.message else "")

    def details(self) -> str:
        lines = [self.headline()]
        if self.expected:
            lines.append(f"  script:   {self.expected}")
        if self.seen:
            lines.append(f"  actual:   {self.seen}")
        if self.recent and self.kind in ("timeout", "mismatch"):
            lines.append("  last packets seen:")
            lines += [f"    {r}" for r in self.recent]
        for t in self.tolerated:
            lines.append(f"  tolerated (RFC 8684 allows it): {t}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return asdict(self)
