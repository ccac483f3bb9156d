"""System checks of the deployment settings; the server runs them before it serves (lifecycle)."""

from django.conf import settings
from django.core.checks import Error, register


@register("security")
def websocket_origins_are_restricted(app_configs, **kwargs):
    if not settings.DEBUG and "*" in settings.WS_ALLOWED_ORIGINS:
        return [
            Error(
                "WS_ALLOWED_ORIGINS allows any origin ('*') with DEBUG off: any web page could "
                "open websockets with its visitors' sessions.",
                hint="List the origins of your UIs in WS_ALLOWED_ORIGINS (or DJANGO_ALLOWED_HOSTS).",
                id="orchestrator_ws.E001",
            )
        ]
    return []
