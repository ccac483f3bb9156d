"""Liveness, readiness and metrics endpoints."""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import sync_to_async

from processes import services
from tests.conftest import redis_layer_config
from tests.servers import free_port
from tests.test_consumers import connected

pytestmark = pytest.mark.django_db(transaction=True)


def test_health_answers(api_client):
    response = api_client.get("/health/")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_ready_checks_database_and_channel_layer(api_client):
    response = api_client.get("/ready/")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok", "channel_layer": "ok"}


def test_not_ready_when_redis_is_down(api_client, settings):
    settings.CHANNEL_LAYERS = {
        "default": redis_layer_config(f"redis://127.0.0.1:{free_port()}/0", command_timeout=0.3)
    }
    response = api_client.get("/ready/")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable" and body["database"] == "ok"
    assert body["channel_layer"].startswith("failing")


async def test_metrics_count_connections_and_broadcasts(broadcast_thread, api_client):
    client = await connected("/api/processes/all/")
    await sync_to_async(services.start_process)(
        "quick_steps", [], created_by="t", broadcast=broadcast_thread.broadcast_process
    )
    for _ in range(6):
        await client.frame()

    async def scrape():
        text = (await sync_to_async(api_client.get)("/metrics")).content.decode()
        return {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line and not line.startswith("#")
        }

    samples = await scrape()
    for _ in range(50):  # the thread counts a batch just after sending it
        if samples["orchestrator_ws_enqueue_to_send_seconds_count"] >= 6:
            break
        await asyncio.sleep(0.05)
        samples = await scrape()
    assert samples['orchestrator_ws_open_connections{group="process-list"}'] >= 1
    assert samples['orchestrator_ws_messages_broadcast_total{group="process-list"}'] >= 6
    assert samples['orchestrator_ws_messages_fanned_out_total{group="process-list"}'] >= 6
    assert samples["orchestrator_ws_enqueue_to_send_seconds_count"] >= 6
    assert "orchestrator_ws_broadcast_queue_depth" in samples
    assert "orchestrator_ws_redis_reconnects_total" in samples
    await client.disconnect()
