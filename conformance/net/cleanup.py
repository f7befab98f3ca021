"""A LIFO stack of undo actions: each resource registers its removal right where it is created."""

from __future__ import annotations

import errno
import traceback
from collections.abc import Callable
from typing import Any

from conformance.errors import HarnessError

# Undoing something that is already gone is fine; anything else is a cleanup failure.
_GONE = {errno.ENOENT, errno.ENODEV, errno.ESRCH}


class Cleanup:
    def __init__(self) -> None:
        self._stack: list[tuple[str, Callable[..., Any], tuple, dict]] = []

    def defer(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        if not callable(fn):
            raise TypeError(f"defer({what!r}): {fn!r} is not callable; pass the function, do not call it")
        self._stack.append((what, fn, args, kwargs))

    def __len__(self) -> int:
        return len(self._stack)

    def run(self) -> None:
        """Undo everything, newest first. Keeps going after a failure, then raises one error
        listing every failed step."""
        failures = []
        while self._stack:
            what, fn, args, kwargs = self._stack.pop()
            try:
                fn(*args, **kwargs)
            except OSError as exc:
                if exc.errno not in _GONE:
                    failures.append(f"{what}: {exc}")
            except Exception as exc:
                failures.append(f"{what}: {exc}\n{traceback.format_exc(limit=3)}")
        if failures:
            raise HarnessError("cleanup failed:\n  " + "\n  ".join(failures))

    def __enter__(self) -> Cleanup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.run()
