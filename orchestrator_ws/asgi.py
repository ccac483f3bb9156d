"""ASGI entry point for daphne: HTTP through Django, websockets through channels.

Importing it starts the server process's broadcast thread (see orchestrator_ws.lifecycle).
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orchestrator_ws.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter  # noqa: E402

from orchestrator_ws import lifecycle  # noqa: E402
from orchestrator_ws.routing import websocket_application  # noqa: E402

application = ProtocolTypeRouter({"http": django_asgi_app, "websocket": websocket_application()})

lifecycle.start()
