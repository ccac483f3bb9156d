"""Protocol constants and the frames every endpoint shares (see docs/websocket-protocol.md)."""

from __future__ import annotations

import json
from typing import Any

Frame = dict[str, Any]

PING = "__ping__"
PONG = "__pong__"

# Close codes, beyond the standard 1000 (normal), 1001 (going away), 1003 (unsupported data),
# 1008 (policy violation), 1009 (message too big), 1013 (try again later).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TOO_BIG = 1009
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_BAD_REQUEST = 4400
CLOSE_NOT_FOUND = 4404

# The subprotocol the v2 UI offers to carry its token; the reply must name it.
BEARER_SUBPROTOCOL = "base64.bearer.token"


def encode(frame: Frame) -> str:
    """Compact JSON text of a frame (UUIDs and datetimes must already be strings)."""
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False)


def error_frame(status_code: int, detail: str, title: str | None = None) -> Frame:
    error: Frame = {"status_code": status_code}
    if title is not None:
        error["title"] = title
    error["detail"] = detail
    return {"error": error}


UNAUTHORIZED = error_frame(401, "Unauthorized")


def resync_frame(seq: int | None) -> Frame:
    """Tells a client it may have missed messages: reload over HTTP, then follow from ``seq``."""
    return {"resync": True, "seq": seq}
