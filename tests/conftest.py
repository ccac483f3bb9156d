"""Shared fixtures and hooks."""

from __future__ import annotations

import pytest

from processes.engine import shutdown_worker_pool


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
