"""The runtime's lock: re-entrant, and fair to callers between steps."""

from __future__ import annotations

import threading
from typing import Any


class FairLock:
    """The runtime's re-entrant lock, counting the threads waiting for it, so the step loop
    can let them in between steps (a plain RLock can be re-taken by the loop at once, and
    a thread opening a stream or asking a question could wait for many steps)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._count = threading.Lock()
        self.waiting = 0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        with self._count:
            self.waiting += 1
        try:
            return self._lock.acquire(blocking, timeout)
        finally:
            with self._count:
                self.waiting -= 1

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> FairLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
