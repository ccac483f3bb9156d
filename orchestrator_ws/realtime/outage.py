"""Logging an outage once: its first failure and its end, not every failure in between.

During a Redis outage every socket and every broadcast fails the same way; a line (or a
traceback) per failure would bury the one line that matters.
"""

from __future__ import annotations

import logging
import threading


class OutageLog:
    def __init__(self, logger: logging.Logger, what: str):
        self.logger = logger
        self.what = what
        self.failures = 0
        self._lock = threading.Lock()

    @property
    def failing(self) -> bool:
        return self.failures > 0

    def failed(self, exc: BaseException | str) -> None:
        with self._lock:
            self.failures += 1
            first = self.failures == 1
        if first:
            self.logger.warning("%s failing: %s", self.what, exc or type(exc).__name__)

    def succeeded(self) -> None:
        with self._lock:
            failures, self.failures = self.failures, 0
        if failures:
            self.logger.warning("%s works again after %d failures", self.what, failures)
