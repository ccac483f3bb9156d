"""Every loss is detected and repaired: seq, replay, resync, injected drops, full queues.

In-process, through channels' communicator, on the in-memory and the Redis layer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer

from orchestrator_ws.realtime.consumers import GroupConsumer
from orchestrator_ws.realtime.transport import QueuedTransport
from processes import messages, services
from processes.models import Process
from processes.process_data_broadcast import ProcessDataBroadcastThread
from tests.conftest import redis_layer_config
from tests.helpers import metric
from tests.servers import RedisServer
from tests.test_consumers import connected, start
from tests.wsclient import WsClient

pytestmark = pytest.mark.django_db(transaction=True)


def frame_message(n: int) -> dict:
    return messages.group_message({"n": n})


async def send_numbered(layer, count: int, start_at: int = 0) -> None:
    for first in range(start_at, start_at + count, 100):
        batch = range(first, min(first + 100, start_at + count))
        await layer.group_send_many([(messages.PROCESS_LIST_GROUP, frame_message(n)) for n in batch])


async def test_list_page_seq_then_since_joins_without_gap_or_duplicate(broadcast_thread, api_client):
    listing = await connected("/api/processes/all/")
    first = await start(broadcast_thread, "quick_steps")
    for _ in range(6):
        await listing.frame()
    await listing.disconnect()

    page = await sync_to_async(api_client.get)("/api/processes/")
    body = page.json()
    assert [p["id"] for p in body["items"]] == [first]
    seq = body["seq"]
    assert seq == 6

    second = await start(broadcast_thread, "quick_steps")
    follower = await connected(f"/api/processes/all/?since={seq}")
    frames = [await follower.frame() for _ in range(6)]
    assert [f["seq"] for f in frames] == list(range(seq + 1, seq + 7))
    assert {f["process"]["id"] for f in frames} == {second}
    assert await follower.nothing()
    await follower.disconnect()


@pytest.fixture
def small_history(settings, request):
    """A layer keeping only five messages per group, on both backends."""
    config = {"history_size": 5, "history_ttl": 60}
    if request.param == "redis":
        settings.CHANNEL_LAYERS = {
            "default": redis_layer_config(request.getfixturevalue("redis_url"), **config)
        }
    else:
        settings.CHANNEL_LAYERS = {
            "default": {"BACKEND": "orchestrator_ws.realtime.layers.InMemoryFanoutLayer", "CONFIG": config}
        }
    return get_channel_layer()


@pytest.mark.parametrize("small_history", ["memory", "redis"], indirect=True)
async def test_since_beyond_the_history_gets_a_flagged_resync_never_a_partial_replay(small_history):
    layer = small_history
    await send_numbered(layer, 12)
    covered = await connected("/api/processes/all/?since=8")
    assert [(await covered.frame())["n"] for _ in range(4)] == [8, 9, 10, 11]
    gone = await connected("/api/processes/all/?since=3")
    assert await gone.frame() == {"resync": True, "seq": 12}
    assert await gone.nothing()
    ahead = await connected("/api/processes/all/?since=40")  # e.g. Redis lost its data
    assert await ahead.frame() == {"resync": True, "seq": 12}
    for client in (covered, gone, ahead):
        await client.disconnect()
    if hasattr(layer, "close"):
        await layer.close()


async def test_detail_resync_is_a_fresh_snapshot_marked_resync(broadcast_thread):
    process_id = await start(broadcast_thread, "confirm_input")
    await sync_wait(lambda: Process.objects.get(pk=process_id).last_status == "suspended", "suspended")
    await asyncio.sleep(0.3)  # the last broadcasts are out: quiet from here on
    current = await get_channel_layer().group_seq(messages.process_detail_group(process_id))
    # Ask for a replay from a seq the group never had: the history cannot cover it.
    client = await connected(f"/api/processes/{process_id}?since={current + 50}")
    resync = await client.frame()
    assert resync["resync"] is True and resync["seq"] == current > 0
    assert resync["process"]["status"] == "suspended"
    await client.disconnect()


async def test_one_percent_dropped_between_layer_and_consumer_is_caught_up(channel_layer, monkeypatch):
    """A message lost between the layer and a consumer: the next one shows the gap (or, for
    the latest message, the layer's audit does), the consumer catches up from the history,
    and the client sees every message in order."""
    rng = random.Random(20261128)
    dropped = []
    total = 1500
    deliver = GroupConsumer.deliver

    def lossy_deliver(self, group, message):
        if message["seq"] < total and rng.random() < 0.01:
            dropped.append(message["seq"])
            return
        deliver(self, group, message)

    monkeypatch.setattr(GroupConsumer, "deliver", lossy_deliver)
    # A dropped *last* message shows no gap until the next one; the periodic audit finds it.
    channel_layer.audit_interval = 0.2
    clients = [await connected("/api/processes/all/") for _ in range(3)]
    repaired_before = metric("orchestrator_ws_gaps_repaired_total", group="process-list")
    received = {client: [] for client in clients}
    for batch_start in range(0, total, 100):  # read as we go, like a live client
        await send_numbered(channel_layer, 100, start_at=batch_start)
        for client in clients:
            received[client] += [await client.frame() for _ in range(100)]
    for client, frames in received.items():
        assert [f["seq"] for f in frames] == list(range(1, total + 1))
        assert [f["n"] for f in frames] == list(range(total))
        await client.disconnect()
    repaired = metric("orchestrator_ws_gaps_repaired_total", group="process-list") - repaired_before
    assert len(dropped) >= 30, f"only {len(dropped)} drops injected"
    # Every drop was noticed at the next message and caught up, except drops that happened
    # while a catch-up was already replaying past them (its history read covered them).
    assert 0 < repaired <= len(dropped), f"{len(dropped)} drops, {repaired} catch-ups"


async def test_one_percent_dropped_after_the_consumer_is_detected_by_the_client(channel_layer, monkeypatch):
    """Drops past the consumer's checks (as if the socket lost them): the client's own seq
    check finds every one of them."""
    rng = random.Random(7)
    dropped = set()
    send_frame = QueuedTransport.send_frame

    def lossy_send_frame(self, frame):
        if '"n":' in frame.text and rng.random() < 0.01:
            dropped.add(json.loads(frame.text)["seq"])
            return True
        return send_frame(self, frame)

    monkeypatch.setattr(QueuedTransport, "send_frame", lossy_send_frame)
    client = await connected("/api/processes/all/")
    total = 1500
    received = []
    for batch_start in range(0, total, 100):
        await send_numbered(channel_layer, 100, start_at=batch_start)
        while (received[-1] if received else 0) < batch_start + 100:
            received.append((await client.frame())["seq"])
    detected = set()
    for previous, seq in zip([0, *received], received, strict=False):
        detected.update(range(previous + 1, seq))  # the client's check: seq must be previous + 1
    assert len(dropped) >= 10
    assert detected == dropped, f"{len(dropped)} dropped, {len(detected & dropped)} detected"
    await client.disconnect()


async def test_broadcast_queue_overflow_and_failed_sends_end_in_a_resync(settings, caplog):
    """Redis paused: the broadcast thread's sends time out, its queue overflows (drop oldest,
    counted, logged once); when Redis answers again the affected groups get a resync."""
    server = RedisServer().start()
    try:
        settings.CHANNEL_LAYERS = {
            "default": redis_layer_config(server.url, command_timeout=0.3, ping_interval=0.2)
        }
        layer = get_channel_layer()
        process_id = await start_process_directly("confirm_input")
        listing = await connected("/api/processes/all/")
        thread = ProcessDataBroadcastThread(layer, max_queue=5, list_coalesce_seconds=0)
        thread.start()
        server.pause()
        caplog.set_level(logging.WARNING)
        for _ in range(200):
            thread.broadcast_process(process_id, status="suspended")
        await sync_wait(lambda: thread.dropped > 0, "drops")
        server.resume()
        frame = await listing.frame(timeout=15)
        while "resync" not in frame:
            frame = await listing.frame(timeout=15)
        assert frame == {"resync": True, "seq": frame["seq"]}
        assert await sync_to_async(thread.stop)(10)
        assert thread.dropped >= 150, thread.dropped
        overflow_lines = [r for r in caplog.records if "broadcast queue failing" in r.getMessage()]
        assert len(overflow_lines) == 1, [r.getMessage() for r in overflow_lines]
        await listing.disconnect()
        await layer.close()
    finally:
        server.resume()
        server.stop()


async def start_process_directly(workflow):
    from processes.engine import no_broadcast

    process_id = await sync_to_async(services.start_process)(
        workflow, [], created_by="t", broadcast=no_broadcast
    )
    return process_id


async def sync_wait(predicate, what):
    from tests.helpers import wait_until

    await sync_to_async(wait_until)(predicate, timeout=20, what=what)


@pytest.mark.parametrize(
    "message, code",
    [
        ({"bytes": b"\x00\x01"}, 1003),
        ({"text": "x" * 5000}, 1009),
    ],
)
async def test_client_messages_other_than_heartbeats_close_with_their_code(broadcast_thread, message, code):
    client = await connected("/api/processes/all/")
    if "bytes" in message:
        await client.communicator.send_to(bytes_data=message["bytes"])
    else:
        await client.send(message["text"])
    assert await client.closed_with() == code


async def test_more_than_ten_messages_a_second_closes_with_1008(broadcast_thread):
    client = await connected("/api/processes/all/")
    for _ in range(10):
        await client.send("__ping__")
    assert [await client.text() for _ in range(10)] == ["__pong__"] * 10
    await client.send("__ping__")
    assert await client.closed_with() == 1008


async def test_connections_per_ip_are_capped_at_the_handshake(broadcast_thread, settings):
    settings.WS_MAX_CONNECTIONS_PER_IP = 2
    peer = {"client": (f"10.0.0.{random.randint(1, 254)}", 40000)}
    first = await connected("/api/processes/all/", **peer)
    second = await connected("/api/processes/all/", **peer)
    third = WsClient("/api/processes/all/", **peer)
    ok, _ = await third.connect()
    assert not ok
    other_peer = await connected("/api/processes/all/", client=("10.1.1.1", 40000))
    await first.disconnect()
    fourth = await connected("/api/processes/all/", **peer)  # a slot freed up
    await other_peer.disconnect()
    await second.disconnect()
    await fourth.disconnect()


async def test_connections_per_token_are_capped(broadcast_thread, settings):
    settings.WS_AUTH_REQUIRED = True
    settings.WS_AUTH_TOKENS = ["t0k3n"]
    settings.WS_MAX_CONNECTIONS_PER_TOKEN = 1
    first = await connected("/api/processes/all/?token=t0k3n")
    second = WsClient("/api/processes/all/?token=t0k3n")
    ok, _ = await second.connect()
    assert not ok
    await first.disconnect()


@pytest.mark.parametrize(
    "headers", [[(b"origin", b"https://evil.example")], [], [(b"origin", b"http://localhost.evil.example")]]
)
async def test_foreign_or_missing_origin_is_refused_before_the_handshake(broadcast_thread, headers):
    client = WsClient("/api/processes/all/", headers=headers)
    ok, _ = await client.connect()
    assert not ok


def test_wildcard_origins_fail_the_system_check_outside_debug(settings):
    from orchestrator_ws.checks import websocket_origins_are_restricted

    settings.WS_ALLOWED_ORIGINS = ["*"]
    settings.DEBUG = False
    [error] = websocket_origins_are_restricted(None)
    assert error.id == "orchestrator_ws.E001"
    settings.DEBUG = True
    assert websocket_origins_are_restricted(None) == []


def test_list_page_answers_without_seq_when_redis_is_down(settings, api_client):
    from tests.servers import free_port

    settings.CHANNEL_LAYERS = {
        "default": redis_layer_config(f"redis://127.0.0.1:{free_port()}/0", command_timeout=0.3)
    }
    response = api_client.get("/api/processes/")
    assert response.status_code == 200
    assert response.json()["seq"] is None
