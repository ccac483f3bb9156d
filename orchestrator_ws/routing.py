"""Websocket paths (orchestrator-core's, with or without a trailing slash) and their stack."""

from channels.routing import URLRouter
from channels.security.websocket import OriginValidator
from django.conf import settings
from django.urls import path, re_path

from orchestrator_ws.realtime.auth import SessionUserMiddlewareStack
from orchestrator_ws.realtime.consumers import RejectHandshake
from processes.consumers import (
    EngineStatusConsumer,
    EventsConsumer,
    ProcessDetailConsumer,
    ProcessListConsumer,
)

websocket_urlpatterns = [
    re_path(r"^api/processes/all/?$", ProcessListConsumer.as_asgi()),
    path("api/processes/<uuid:process_id>", ProcessDetailConsumer.as_asgi()),
    path("api/processes/<uuid:process_id>/", ProcessDetailConsumer.as_asgi()),
    re_path(r"^api/settings/ws-status/?$", EngineStatusConsumer.as_asgi()),
    re_path(r"^api/ws/events/?$", EventsConsumer.as_asgi()),
    # Anything else, a non-UUID process id included, is refused at the handshake.
    re_path(r"", RejectHandshake.as_asgi()),
]


def websocket_application():
    """Origin check (before the handshake completes), session user, then the endpoints."""
    return OriginValidator(
        SessionUserMiddlewareStack(URLRouter(websocket_urlpatterns)), settings.WS_ALLOWED_ORIGINS
    )
