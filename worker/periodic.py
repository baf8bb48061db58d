"""A daemon thread that runs one pass every `interval` seconds inside a long-lived process (the embedded API,
`grove reconcile`), until stopped. A failed pass is logged and the next one runs as usual."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class PeriodicThread(threading.Thread):
    def __init__(self, name: str, interval: float, run_pass: Callable[[], object]):
        super().__init__(name=name, daemon=True)
        self.interval = interval
        self._run_pass = run_pass
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                self._run_pass()
            except Exception:
                log.exception("%s pass failed", self.name)

    def stop(self) -> None:
        self._stop_event.set()
