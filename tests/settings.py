"""Settings for the test suite: the project's settings with a development secret key."""

import os

os.environ.setdefault("DJANGO_DEBUG", "1")

from orchestrator_ws.settings import *  # noqa: E402,F403
