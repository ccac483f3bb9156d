"""Who is on the other end of a websocket: the Django session user, read-only.

channels' AuthMiddlewareStack wraps ``send`` to save sessions, which websockets never do, and
the wrapper would hide daphne's own ``send`` from the direct transport. This stack reads the
session cookie and resolves the user the same way, and passes ``send`` through untouched.
"""

from __future__ import annotations

from importlib import import_module

from channels.auth import AuthMiddleware
from channels.sessions import CookieMiddleware
from django.conf import settings


class ReadOnlySessionMiddleware:
    """Puts the session named by the request's cookie in ``scope["session"]``."""

    def __init__(self, inner):
        self.inner = inner
        self.session_store = import_module(settings.SESSION_ENGINE).SessionStore

    async def __call__(self, scope, receive, send):
        session_key = scope["cookies"].get(settings.SESSION_COOKIE_NAME)
        return await self.inner(dict(scope, session=self.session_store(session_key)), receive, send)


def SessionUserMiddlewareStack(inner):  # noqa: N802 - named like channels' AuthMiddlewareStack
    return CookieMiddleware(ReadOnlySessionMiddleware(AuthMiddleware(inner)))
