"""Broadcasting process changes to websocket clients (filled in by the real-time layer)."""

from __future__ import annotations

from django.http import HttpRequest

from processes.engine import BroadcastFunc, no_broadcast


def api_broadcast_process_data(request: HttpRequest | None) -> BroadcastFunc:
    """The function a view hands to the services to announce process changes."""
    return no_broadcast
