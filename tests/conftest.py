"""Shared fixtures and hooks."""

from __future__ import annotations

import os
import uuid

import pytest

from processes.engine import shutdown_worker_pool
from tests.servers import RedisServer, TemporaryDatabase


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item):
    """Stop the worker pool before any fixture teardown, the test database flush included.

    A run still executing after the flush would write into the next test's tables.
    """
    shutdown_worker_pool()


@pytest.fixture
def api_client():
    from django.test import Client

    return Client(HTTP_HOST="localhost")


@pytest.fixture(scope="session")
def redis_url():
    """REDIS_URL when set, otherwise a private redis-server started for this test session."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    server = RedisServer().start()
    yield server.url
    server.stop()


def redis_layer_config(url: str, **config) -> dict:
    return {
        "BACKEND": "orchestrator_ws.realtime.redis_layer.RedisFanoutLayer",
        # A prefix of its own per test: no state leaks between tests sharing one Redis.
        "CONFIG": {"url": url, "prefix": f"test-{uuid.uuid4().hex[:8]}", **config},
    }


@pytest.fixture(params=["memory", "redis"])
async def channel_layer(request, settings):
    """The channel layer consumers and the broadcast thread share: in-memory, then Redis."""
    from channels.layers import get_channel_layer

    if request.param == "redis":
        settings.CHANNEL_LAYERS = {"default": redis_layer_config(request.getfixturevalue("redis_url"))}
    else:
        settings.CHANNEL_LAYERS = {
            "default": {"BACKEND": "orchestrator_ws.realtime.layers.InMemoryFanoutLayer"}
        }
    layer = get_channel_layer()
    yield layer
    if hasattr(layer, "close"):
        await layer.close()


@pytest.fixture
def broadcast_thread(channel_layer, settings):
    """This test's ProcessDataBroadcastThread, with list coalescing off: every step is sent."""
    from processes.process_data_broadcast import start_broadcast_thread, stop_broadcast_thread

    settings.PROCESS_LIST_COALESCE_SECONDS = 0
    thread = start_broadcast_thread(channel_layer)
    yield thread
    stop_broadcast_thread()


@pytest.fixture(scope="session", autouse=True)
def _close_connections_of_async_tests(django_db_setup, django_db_blocker):
    """Close the connection asgiref's shared thread opened for async tests' database calls.

    Without it PostgreSQL refuses to drop the test database ("accessed by other users").
    """
    yield
    from asgiref.sync import SyncToAsync
    from django.db import connections

    SyncToAsync.single_thread_executor.submit(connections.close_all).result()


@pytest.fixture
def database():
    """A database of its own for server processes (SQLite file, or a new PostgreSQL DB)."""
    db = TemporaryDatabase().create()
    yield db
    db.drop()
