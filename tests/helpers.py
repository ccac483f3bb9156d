"""Small helpers shared by the tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from prometheus_client import REGISTRY

T = TypeVar("T")


def wait_until(probe: Callable[[], T], *, timeout: float = 10.0, interval: float = 0.02, what: str = "") -> T:
    """Poll ``probe`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or probe}")
        time.sleep(interval)


def metric(name: str, **labels) -> float:
    """A sample of this process's Prometheus registry (0 before its first observation)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


MASK = b"\x37\xfa\x21\x3d"


def client_frame(payload: bytes, *, opcode: int = 0x1, fin: bool = True, masked: bool = True) -> bytes:
    """A client-to-server websocket frame of under 126 bytes (RFC 6455, 5.2)."""
    assert len(payload) < 126
    head = bytes(((0x80 if fin else 0) | opcode, (0x80 if masked else 0) | len(payload)))
    if not masked:
        return head + payload
    return head + MASK + bytes(byte ^ MASK[i % 4] for i, byte in enumerate(payload))
