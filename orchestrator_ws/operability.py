"""Endpoints for operators and their tools: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import asyncio

from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from orchestrator_ws.realtime.layers import FanoutChannelLayer

READY_TIMEOUT = 3.0


def health(request: HttpRequest) -> JsonResponse:
    """Liveness: the process answers HTTP."""
    return JsonResponse({"status": "ok"})


def _database_answers() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


async def ready(request: HttpRequest) -> JsonResponse:
    """Readiness: the database and the channel layer answer (each within a few seconds)."""
    checks = {}
    try:
        await asyncio.wait_for(sync_to_async(_database_answers)(), READY_TIMEOUT)
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"failing: {exc or type(exc).__name__}"
    layer = get_channel_layer()
    try:
        if isinstance(layer, FanoutChannelLayer):
            await asyncio.wait_for(layer.group_seq("readiness-probe"), READY_TIMEOUT)
        checks["channel_layer"] = "ok"
    except Exception as exc:
        checks["channel_layer"] = f"failing: {exc or type(exc).__name__}"
    healthy = all(value == "ok" for value in checks.values())
    return JsonResponse(
        {"status": "ok" if healthy else "unavailable", **checks}, status=200 if healthy else 503
    )


def metrics(request: HttpRequest) -> HttpResponse:
    """This server process's metrics in Prometheus' text format."""
    return HttpResponse(generate_latest(), content_type=CONTENT_TYPE_LATEST)
