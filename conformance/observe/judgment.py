"""A passive rule's verdict on one connection, and the tally that streaming rules keep to reach it."""

from __future__ import annotations

from dataclasses import dataclass, field

from conformance.observe.model import Where

PASS, FAIL, NOT_EXERCISED = "pass", "fail", "not exercised"


@dataclass
class Judgment:
    rid: str
    outcome: str  # pass | fail | not exercised
    sentence: str
    where: list[Where] = field(default_factory=list)
    connection: int | None = None  # index in the capture's connections

    def __str__(self) -> str:
        frames = ", ".join(str(w) for w in self.where[:3])
        return f"[{self.rid}] {self.outcome}: {self.sentence}" + (f" ({frames})" if frames else "")


@dataclass
class Tally:
    """How often something held and did not, keeping only the first frame of each (and what the
    first failure looked like): a streaming rule's whole memory of a connection."""

    passed: int = 0
    failed: int = 0
    first_pass: Where | None = None
    first_fail: Where | None = None
    seen: str = ""

    def ok(self, where: Where) -> None:
        self.passed += 1
        if self.first_pass is None:
            self.first_pass = where

    def bad(self, where: Where, seen: str) -> None:
        self.failed += 1
        if self.first_fail is None:
            self.first_fail, self.seen = where, seen

    def judgment(self, rid: str, wants: str, unit: str) -> Judgment:
        """FAIL if anything failed (with the first failure), else PASS over everything judged."""
        if self.failed:
            return Judgment(rid, FAIL, f"wants {wants}; {self.failed} of {self.passed + self.failed} {unit} "
                            f"do not, the first: {self.seen}", [self.first_fail])
        return Judgment(rid, PASS, f"{wants}: all {self.passed} {unit}", [self.first_pass])
