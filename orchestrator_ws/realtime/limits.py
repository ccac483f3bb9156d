"""What a websocket client may do: connections per IP and per token, and what it may send.

Clients only ever send heartbeats, so anything else that is big, binary or frequent is hostile
or broken, and its connection is closed with the code that says why.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter

from django.conf import settings

from orchestrator_ws.realtime.protocol import (
    CLOSE_POLICY_VIOLATION,
    CLOSE_TOO_BIG,
    CLOSE_UNSUPPORTED_DATA,
)


class ConnectionCounter:
    """Open connections per client IP and per token, in this server process."""

    def __init__(self) -> None:
        self._open: Counter[str] = Counter()

    @staticmethod
    def keys(client_ip: str | None, token: str | None) -> list[tuple[str, int]]:
        """The counters a connection takes, each with its limit (0: unlimited)."""
        keys = []
        if client_ip:
            keys.append((f"ip:{client_ip}", settings.WS_MAX_CONNECTIONS_PER_IP))
        if token:
            # Counted by digest: the token itself is never kept or logged.
            digest = hashlib.sha256(token.encode()).hexdigest()[:16]
            keys.append((f"token:{digest}", settings.WS_MAX_CONNECTIONS_PER_TOKEN))
        return keys

    def acquire(self, keys: list[tuple[str, int]]) -> str | None:
        """Count a new connection; returns the exceeded key instead when a limit is reached."""
        for key, limit in keys:
            if limit and self._open[key] >= limit:
                return key.split(":", 1)[0]
        for key, _ in keys:
            self._open[key] += 1
        return None

    def release(self, keys: list[tuple[str, int]]) -> None:
        for key, _ in keys:
            self._open[key] -= 1
            if self._open[key] <= 0:
                del self._open[key]


open_connections = ConnectionCounter()


class ClientMessageGuard:
    """Checks each message a client sends; ``check`` returns a close code for an offence."""

    def __init__(self) -> None:
        self._window_start = time.monotonic()
        self._in_window = 0

    def check(self, message: dict) -> int | None:
        if message.get("bytes") is not None:
            return CLOSE_UNSUPPORTED_DATA
        if len((message.get("text") or "").encode()) > settings.WS_MAX_CLIENT_MESSAGE_BYTES:
            return CLOSE_TOO_BIG
        now = time.monotonic()
        if now - self._window_start >= 1.0:
            self._window_start, self._in_window = now, 0
        self._in_window += 1
        if self._in_window > settings.WS_MAX_CLIENT_MESSAGES_PER_SECOND:
            return CLOSE_POLICY_VIOLATION
        return None
