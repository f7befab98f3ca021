"""Exception types. Harness problems, bad input and missing capabilities are kept apart from
conformance failures, which are ordinary assertion failures of a case."""

from __future__ import annotations


class HarnessError(Exception):
    """The harness itself broke (a command failed, a process did not start)."""


class NotExercised(HarnessError):
    """The condition a case is about did not arise this run, for a reason the harness does not
    control (a race under load): not a verdict. Cases that can hit one are marked to run again."""


class CommandError(HarnessError):
    """A command exited non-zero; carries enough context to debug it from the message alone."""

    def __init__(self, argv: list[str], rc: int, stdout: str, stderr: str, netns: str | None = None):
        self.argv, self.rc, self.stdout, self.stderr, self.netns = argv, rc, stdout, stderr, netns
        where = f" in netns {netns}" if netns else ""
        tail = (stderr or stdout).strip().splitlines()[-3:]
        super().__init__(f"command failed (exit {rc}){where}: {' '.join(argv)}" + (
            "\n  " + "\n  ".join(tail) if tail else ""))


class TopologyError(HarnessError):
    """A topology asks for something that cannot be built here (or is malformed)."""


class InputError(Exception):
    """User input (a file, an argument) is malformed. The message names the input and the place."""


class CapabilityMissing(Exception):
    """This machine lacks something a case needs; the message is the doctor's reason."""
