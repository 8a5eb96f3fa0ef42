"""The normalized state out: each device's latest state, published at most once per interval.

`bridge-ecoflow/<device>/json/state` is retained and says how a device is now, so a consumer
needs the newest state, not every one: a device's first reading after a quiet interval is
published at once, and readings that follow inside the interval are folded into one publish of
the newest at the interval's end. A station sending several partial messages a second (or a
backlog drained at thousands a second) then costs the broker one state per device per
interval. Publishing happens on one thread, so a device's states leave in order.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class StateOut:
    def __init__(self, send: Callable[[Any], None], min_interval: float = 1.0):
        """`send(item)` publishes one device's newest item (called on this object's thread);
        `min_interval` is the least time between two publishes for one device (0: every
        item, unless the thread is still busy with the previous one)."""
        self.send = send
        self.min_interval = min_interval
        self.published = 0
        self._pending: dict[str, Any] = {}
        self._last: dict[str, float] = {}
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    def start(self) -> StateOut:
        self._thread = threading.Thread(target=self._run, name="state-out", daemon=True)
        self._thread.start()
        return self

    def offer(self, key: str, item: Any) -> None:
        """The newest item for `key` (a device); replaces one not yet published."""
        with self._cond:
            new = key not in self._pending
            self._pending[key] = item
            if new:  # the thread's wake-up time may now be earlier
                self._cond.notify()

    def stop(self) -> None:
        """Publish what is pending, then stop the thread."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(5)

    def _due(self, now: float) -> tuple[list[tuple[str, Any]], float | None]:
        """Items whose device may publish now (all of them when stopping), and how long until
        the next pending one may."""
        due, wait = [], None
        for key in list(self._pending):
            left = self._last.get(key, -1e18) + self.min_interval - now
            if left <= 0 or self._stop:
                due.append((key, self._pending.pop(key)))
                self._last[key] = now
            elif wait is None or left < wait:
                wait = left
        return due, wait

    def _run(self) -> None:
        while True:
            with self._cond:
                due, wait = self._due(time.monotonic())
                if not due:
                    if self._stop:
                        return
                    self._cond.wait(wait)
                    continue
            for _key, item in due:
                try:
                    self.send(item)
                    self.published += 1
                except Exception:
                    log.exception("publishing a normalized state failed")
