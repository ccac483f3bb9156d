"""ProcessDataBroadcastThread under many concurrent workers, on both layers."""

from __future__ import annotations

import threading
import time

import pytest
from asgiref.sync import sync_to_async
from django.db import connection
from django.db.backends.signals import connection_created

from processes import messages, selectors, services
from processes.engine import no_broadcast
from processes.models import Process
from processes.process_data_broadcast import ProcessDataBroadcastThread, ProcessUpdate
from tests.helpers import wait_until
from tests.test_layers import Member, joined, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def make_processes(count):
    ids = [
        services.start_process("confirm_input", [], created_by="t", broadcast=no_broadcast)
        for _ in range(count)
    ]
    wait_until(lambda: Process.objects.filter(last_status="suspended").count() == count)
    return ids


async def test_many_workers_enqueueing_at_once_lose_nothing_and_keep_order(channel_layer):
    ids = await sync_to_async(make_processes)(10)
    listing, events = Member(), Member()
    await joined(channel_layer, messages.PROCESS_LIST_GROUP, listing)
    await joined(channel_layer, messages.EVENTS_GROUP, events)
    thread = ProcessDataBroadcastThread(channel_layer, list_coalesce_seconds=0)
    thread.start()
    workers, per_worker = 8, 100
    enqueue_times = []

    def worker(n):
        for i in range(per_worker):
            began = time.perf_counter()
            thread.broadcast_process(ids[(n + i) % len(ids)], status="suspended", step_id=None)
            enqueue_times.append(time.perf_counter() - began)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = workers * per_worker
    await wait_for(lambda: len(listing.messages) == total, timeout=60)
    assert await sync_to_async(thread.stop)(10)
    assert [m["seq"] for m in listing.messages] == list(range(1, total + 1))
    assert thread.dropped == 0 and not thread.sending.failing
    enqueue_times.sort()
    p99 = enqueue_times[int(len(enqueue_times) * 0.99)]
    assert p99 < 0.001, f"enqueue p99 {p99 * 1e6:.0f} µs"  # a queue put, never a wait on the layer


async def test_list_updates_of_one_process_are_coalesced(channel_layer):
    [process_id] = await sync_to_async(make_processes)(1)
    listing = Member()
    await joined(channel_layer, messages.PROCESS_LIST_GROUP, listing)
    thread = ProcessDataBroadcastThread(channel_layer, list_coalesce_seconds=0.2)
    thread.start()
    for _ in range(30):
        thread.enqueue(ProcessUpdate(process_id, status="suspended"))
    await wait_for(lambda: len(listing.messages) == 2, timeout=5)
    assert await sync_to_async(thread.stop)(10)
    # The first change at once, the 29 that followed within the window as one message.
    assert len(listing.messages) == 2


async def test_stop_drains_the_queue_before_the_thread_ends(channel_layer):
    ids = await sync_to_async(make_processes)(3)
    listing, details = Member(), [Member() for _ in ids]
    await joined(channel_layer, messages.PROCESS_LIST_GROUP, listing)
    for process_id, member in zip(ids, details, strict=True):
        await joined(channel_layer, messages.process_detail_group(process_id), member)
    thread = ProcessDataBroadcastThread(channel_layer, list_coalesce_seconds=0.5)
    thread.start()
    for n in range(300):
        thread.broadcast_process(ids[n % 3], status="suspended")
    assert await sync_to_async(thread.stop)(10)
    # Every queued update went out before the thread ended: 100 detail messages per process...
    await wait_for(lambda: all(len(member.messages) == 100 for member in details), timeout=5)
    assert thread.queue.empty()
    # ...and the coalesced list updates were flushed, each process's latest state included.
    await wait_for(lambda: len(listing.messages) >= 6, timeout=5)
    assert {m["text"].split('"process_id":"')[1][:36] for m in listing.messages[-3:]} == {str(i) for i in ids}
    assert len(listing.messages) < 100, "the list was not coalesced"


async def test_an_unwatched_detail_gets_a_resync_marker_instead_of_its_detail(channel_layer):
    watched_id, unwatched_id = await sync_to_async(make_processes)(2)
    watcher = Member()
    await joined(channel_layer, messages.process_detail_group(watched_id), watcher)
    thread = ProcessDataBroadcastThread(channel_layer, list_coalesce_seconds=0)
    thread.start()
    thread.broadcast_process(watched_id, status="suspended")
    thread.broadcast_process(unwatched_id, status="suspended")
    await wait_for(lambda: len(watcher.messages) == 1)
    assert await sync_to_async(thread.stop)(10)
    assert watcher.messages[0]["type"] == "group.frame" and '"process":' in watcher.messages[0]["text"]
    # The unwatched group's seq still moved, with a marker a later replay cannot pass silently.
    history = await channel_layer.group_history(messages.process_detail_group(unwatched_id), 0)
    assert history.seq == 1
    assert [m["type"] for m in history.messages] == ["group.resync"]


async def test_the_thread_drives_the_stock_pubsub_layer_too(redis_url):
    """The benchmark's baseline: stock layers proxy attributes to per-loop state, which must
    not kill the thread (its loop is not running between batches)."""
    import asyncio

    from channels_redis.pubsub import RedisPubSubChannelLayer

    [process_id] = await sync_to_async(make_processes)(1)
    layer = RedisPubSubChannelLayer(hosts=[redis_url])
    channel = await layer.new_channel()
    await layer.group_add(messages.PROCESS_LIST_GROUP, channel)
    thread = ProcessDataBroadcastThread(layer, list_coalesce_seconds=0)
    thread.start()
    thread.broadcast_process(process_id, status="suspended")
    received = await asyncio.wait_for(layer.receive(channel), 10)
    assert received["type"] == "group.frame" and str(process_id) in received["text"]
    assert thread.is_alive()
    assert await sync_to_async(thread.stop)(10)
    await layer.flush()


async def test_the_thread_keeps_one_database_connection_across_batches(channel_layer):
    ids = await sync_to_async(make_processes)(2)
    listing = Member()
    await joined(channel_layer, messages.PROCESS_LIST_GROUP, listing)
    opened = []

    def note_connection(sender, connection, **kwargs):
        opened.append(threading.current_thread().name)

    connection_created.connect(note_connection)
    thread = ProcessDataBroadcastThread(channel_layer, list_coalesce_seconds=0)
    thread.start()
    try:
        for i in range(20):  # one batch each: every update waits for the previous one's delivery
            thread.broadcast_process(ids[i % 2], status="suspended", step_id=None)
            await wait_for(lambda i=i: len(listing.messages) == i + 1)
    finally:
        assert await sync_to_async(thread.stop)(10)
        connection_created.disconnect(note_connection)
    assert opened.count(thread.name) == 1, opened


async def test_a_broken_database_connection_costs_a_resync_then_is_replaced(channel_layer, monkeypatch):
    """The batch whose read fails marks its groups lost (their clients resync: nothing passes
    silently); the next batch opens a new connection and carries on."""
    ids = await sync_to_async(make_processes)(1)
    listing = Member()
    await joined(channel_layer, messages.PROCESS_LIST_GROUP, listing)
    read_processes = selectors.processes
    broken = []

    def break_the_connection_once(process_ids):
        if not broken:
            broken.append(True)
            connection.connection.close()  # under Django's feet, as a dropped server would
        return read_processes(process_ids)

    monkeypatch.setattr(selectors, "processes", break_the_connection_once)
    thread = ProcessDataBroadcastThread(channel_layer, list_coalesce_seconds=0)
    thread.start()
    try:
        thread.broadcast_process(ids[0], status="suspended", step_id=None)
        await wait_for(lambda: len(listing.messages) == 1)
        assert listing.messages[0]["type"] == "group.resync"
        thread.broadcast_process(ids[0], status="suspended", step_id=None)
        await wait_for(lambda: len(listing.messages) == 2)
    finally:
        assert await sync_to_async(thread.stop)(10)
    assert listing.messages[1]["type"] == "group.frame"
    assert [m["seq"] for m in listing.messages] == [1, 2]
