"""Settings for the test suite: the project's settings with a development secret key.

The suite picks its channel layer per test (tests/conftest.py), never from REDIS_URL, so every
test runs the same with or without a Redis in the environment.
"""

import os

os.environ.setdefault("DJANGO_DEBUG", "1")

from orchestrator_ws.settings import *  # noqa: E402,F403

CHANNEL_LAYERS = {"default": {"BACKEND": "orchestrator_ws.realtime.layers.InMemoryFanoutLayer"}}
