"""Non-fatal expectations for conformance cases: every check runs, every failure is reported.

A failure says what the requirement expects and what was seen on the wire (with capture file and
frame) or in the kernel's counters; passed checks become the case's evidence in the report."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Check:
    requirement: str | None
    what: str
    expected: str
    seen: str
    ok: bool
    deviation: str | None = None  # a failure the implementation is known for (deviations.yaml): why
    oracle: bool = False  # a check of our judges against each other (tshark, counters), not of the implementation

    def __str__(self) -> str:
        rid = f"[{self.requirement}] " if self.requirement else ""
        if self.ok:
            return f"{rid}{self.what}: {self.seen}"
        known = f" (known deviation: {self.deviation})" if self.deviation else ""
        return f"{rid}{self.what}: expected {self.expected}; seen {self.seen}{known}"


class CaseFailed(AssertionError):
    """The implementation did not do what the requirement(s) ask (a conformance failure)."""


class OracleDisagreement(CaseFailed):
    """Only our judges disagree (the passive rules against tshark or the kernel's counters, our
    codec against tshark): no verdict on the implementation can be trusted until that is fixed."""


@dataclass
class Expect:
    checks: list[Check] = field(default_factory=list)
    # node -> the MIB counters its kernel has (another kernel generation may lack some).
    counter_names: dict[str, set[str]] = field(default_factory=dict)

    def that(self, ok: bool, what: str, *, expected: str, seen: object, rid: str | None = None,
             deviation: str | None = None, oracle: bool = False) -> bool:
        self.checks.append(Check(rid, what, expected, str(seen), bool(ok), None if ok else deviation, oracle))
        return bool(ok)

    def equal(self, actual: object, wanted: object, what: str, *, seen: object | None = None,
              rid: str | None = None) -> bool:
        return self.that(actual == wanted, what, expected=repr(wanted),
                         seen=f"{actual!r}" + (f" ({seen})" if seen is not None else ""), rid=rid)

    def counter(self, counters: dict[str, dict[str, int]], node: str, name: str, wanted: int | range,
                *, rid: str | None = None, deviation: str | None = None) -> bool:
        full = name if name.startswith(("MPTcp", "Tcp")) else f"MPTcpExt{name}"
        if node in self.counter_names and full not in self.counter_names[node]:
            # Not a verdict either way: the kernel on `node` does not count this.
            return self.that(True, f"{node} counter {full}: this kernel has no such counter, not judged",
                             expected="-", seen="no such counter")
        got = counters.get(node, {}).get(full, 0)
        ok = got in wanted if isinstance(wanted, range) else got == wanted
        want = (f"{wanted.start}..{wanted.stop - 1}" if isinstance(wanted, range) else str(wanted))
        return self.that(ok, f"{node} counter {full}", expected=want, seen=f"{got}", rid=rid, deviation=deviation)

    @property
    def failures(self) -> list[Check]:
        """Failed checks, known deviations excepted (they are reported, not failed)."""
        return [c for c in self.checks if not c.ok and not c.deviation]

    def evidence(self) -> list[str]:
        return [str(c) for c in self.checks]

    def verdict(self, claimed: tuple[str, ...] = ()) -> None:
        """Raise CaseFailed listing every failed check. A case that checked nothing, or names a
        requirement (`claimed`) without any check about it, proves nothing: that fails too."""
        if not self.checks:
            raise CaseFailed("the case made no check on the wire or the counters")
        if self.failures:
            lines = "\n".join(f"  - {c}" for c in self.failures)
            kind = OracleDisagreement if all(c.oracle for c in self.failures) else CaseFailed
            raise kind(f"{len(self.failures)} of {len(self.checks)} checks failed:\n{lines}")
        unproved = [rid for rid in claimed if not any(c.requirement == rid for c in self.checks)]
        if unproved:
            raise CaseFailed(f"the case names {', '.join(unproved)} but made no check about "
                             f"{'it' if len(unproved) == 1 else 'them'} (tag a check with rid=...)")
