"""A LIFO stack of undo actions: each resource registers its removal right where it is created."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from conformance.errors import HarnessError

# Undoing something that is already gone is fine; anything else is a cleanup failure.
_GONE = {errno.ENOENT, errno.ENODEV, errno.ESRCH}


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back until the block ends (a second signal interrupts at once).

    Bring-up forks many helpers; a KeyboardInterrupt raised inside an after-fork callback is only
    printed ("Exception ignored in ...") and lost, and the build would carry on regardless."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    owner, pending = os.getpid(), []

    def hold(signum, frame):
        if os.getpid() != owner:  # a forked helper inherited this handler: just die
            os._exit(128 + signum)
        if pending:
            raise KeyboardInterrupt(f"signal {signum}")
        pending.append(signum)

    previous = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if pending:
        raise KeyboardInterrupt(f"signal {pending[0]}")


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
        interrupted: BaseException | None = None
        while self._stack:
            what, fn, args, kwargs = self._stack.pop()
            try:
                fn(*args, **kwargs)
            except OSError as exc:
                if exc.errno not in _GONE:
                    failures.append(f"{what}: {exc}")
            except Exception as exc:
                failures.append(f"{what}: {exc}\n{traceback.format_exc(limit=3)}")
            except BaseException as exc:  # a second Ctrl-C: finish undoing first, then stop
                interrupted = interrupted or exc
        if interrupted is not None:
            raise interrupted
        if failures:
            raise HarnessError("cleanup failed:\n  " + "\n  ".join(failures))

    def __enter__(self) -> Cleanup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.run()
