"""Logging an outage once: its first failure and its end, not every failure in between.

During a Redis outage every socket and every broadcast fails the same way; a line (or a
traceback) per failure would bury the one line that matters. Many callers share one log, so
while some still fail and others already succeed, the outage is over only once a success
comes ``settle`` seconds after the last failure.
"""

from __future__ import annotations

import logging
import threading
import time


class OutageLog:
    def __init__(self, logger: logging.Logger, what: str, settle: float = 1.0):
        self.logger = logger
        self.what = what
        self.settle = settle
        self.failures = 0
        self._last_failure = 0.0
        self._lock = threading.Lock()

    @property
    def failing(self) -> bool:
        return self.failures > 0

    def failed(self, exc: BaseException | str) -> None:
        with self._lock:
            self.failures += 1
            self._last_failure = time.monotonic()
            first = self.failures == 1
        if first:
            self.logger.warning("%s failing: %s", self.what, exc or type(exc).__name__)

    def succeeded(self) -> None:
        with self._lock:
            if not self.failures or time.monotonic() - self._last_failure < self.settle:
                return
            failures, self.failures = self.failures, 0
        self.logger.warning("%s works again after %d failures", self.what, failures)
