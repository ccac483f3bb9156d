"""Every websocket endpoint and protocol rule, through channels' WebsocketCommunicator.

Each test runs twice: on the in-memory layer and on the Redis layer (a real Redis). Processes
run on the real worker pool and reach the consumers through the real broadcast thread.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer

from engine_status import services as engine_lock
from orchestrator_ws.realtime.consumers import GroupConsumer
from orchestrator_ws.realtime.layers import Batch, stamp
from processes import messages, services
from processes.models import Process
from tests.clients import assert_contiguous
from tests.helpers import wait_until
from tests.wsclient import WsClient

pytestmark = pytest.mark.django_db(transaction=True)


async def start(thread, workflow, inputs=None):
    return str(
        await sync_to_async(services.start_process)(
            workflow, inputs or [], created_by="ws-test", broadcast=thread.broadcast_process
        )
    )


async def connected(path, **kwargs) -> WsClient:
    client = WsClient(path, **kwargs)
    ok, _ = await client.connect()
    assert ok, f"handshake refused on {path}"
    return client


def seqs(frames):
    return [f["seq"] for f in frames]


async def test_process_list_sends_nothing_on_connect_then_every_change(broadcast_thread):
    client = await connected("/api/processes/all/")
    assert await client.nothing()
    process_id = await start(broadcast_thread, "quick_steps")
    # One message per change (Start, picked up by a worker, 3 steps, Done), each carrying the
    # process's state when it was broadcast.
    frames = [await client.frame() for _ in range(6)]
    assert await client.nothing()
    assert {f["process"]["process_id"] for f in frames} == {process_id}
    assert frames[-1]["process"]["last_step"] == "Done"
    assert frames[-1]["process"]["status"] == "completed"
    assert seqs(frames) == list(range(seqs(frames)[0], seqs(frames)[0] + len(frames)))
    summary = frames[-1]["process"]
    assert summary["id"] == summary["process_id"] and summary["status"] == summary["last_status"]
    assert summary["step"] == "Done" and summary["workflow_target"] == "CREATE"
    assert "steps" not in summary
    await client.disconnect()


async def test_process_detail_snapshot_then_every_step_then_close(broadcast_thread):
    process_id = await start(broadcast_thread, "long_running", [{"step_delay": 0.05}])
    client = await connected(f"/api/processes/{process_id}")
    snapshot = await client.frame()
    assert snapshot["process"]["process_id"] == process_id
    assert isinstance(snapshot["seq"], int)
    assert snapshot["process"]["steps"][0]["name"] == "Start"

    updates = await client.frames_until(lambda f: f.get("close"))
    # A snapshot is read after the seq it carries, so it may already hold the step of the next
    # message or two: a client merges steps by step_id. None may be missing. A resync snapshot
    # may come too (the broadcast thread sends a resync marker, not the detail, when it saw
    # nobody watching as the client joined); it restarts the stream at a later seq.
    assert_contiguous([snapshot, *updates])
    steps = {}
    for frame in [snapshot, *updates]:
        logged = frame["process"]["steps"] if "step" not in frame else [frame["step"]]
        for step in logged:
            if step["status"] != "pending":
                steps.setdefault(step["step_id"], step["name"])
    assert list(steps.values()) == ["Start", *(f"Slow step {i}" for i in range(1, 6)), "Done"]
    # "close" comes with the message of the step that ended the process, not before.
    assert not any(f.get("close") for f in updates[:-1])
    assert all(f["step"]["name"] != "Done" for f in updates[:-1] if "step" in f)
    final = updates[-1]
    assert final["close"] is True and final["step"]["status"] == "complete"
    assert final["process"]["status"] == "completed"
    assert {"step_id", "state", "state_delta", "created_by", "executed"} <= set(final["step"])
    assert await client.closed_with() == 1000


async def test_detail_of_unknown_process_gets_404_and_4404(broadcast_thread):
    client = await connected(f"/api/processes/{uuid.uuid4()}")
    frame = await client.frame()
    assert frame["error"]["status_code"] == 404
    assert frame["error"]["title"] == "Not Found"
    assert "not found" in frame["error"]["detail"]
    assert await client.closed_with() == 4404


@pytest.mark.parametrize(
    "path", ["/api/processes/not-a-uuid", "/api/nothing/here", "/api/processes/all/extra"]
)
async def test_unknown_paths_and_non_uuid_ids_are_rejected_at_handshake(broadcast_thread, path):
    client = WsClient(path)
    ok, _ = await client.connect()
    assert not ok


async def test_engine_status_snapshot_and_changes(broadcast_thread):
    client = await connected("/api/settings/ws-status/")
    snapshot = await client.frame()
    assert snapshot["engine-status"] == {
        "global_lock": False,
        "running_processes": 0,
        "global_status": "RUNNING",
    }

    # Steps of a second: the lock lands well before the run's next step boundary.
    await start(broadcast_thread, "long_running", [{"step_delay": 1.0}])
    running = await client.frames_until(lambda f: f["engine-status"]["running_processes"] == 1)
    assert running[-1]["engine-status"]["global_status"] == "RUNNING"
    # The run counts as running from its claim, a moment before the worker's first look at the
    # lock: let it get into its first step, or the lock stops it before it began (straight to PAUSED).
    await asyncio.sleep(0.3)
    await sync_to_async(engine_lock.set_global_lock)(True)
    frames = await client.frames_until(lambda f: f["engine-status"]["global_status"] == "PAUSED")
    statuses = [f["engine-status"]["global_status"] for f in frames]
    assert statuses[0] == "PAUSING" and statuses[-1] == "PAUSED", frames
    assert frames[-1]["engine-status"] == {
        "global_lock": True,
        "running_processes": 0,
        "global_status": "PAUSED",
    }
    await sync_to_async(engine_lock.set_global_lock)(False)
    unlocked = await client.frames_until(lambda f: not f["engine-status"]["global_lock"])
    assert unlocked[-1]["engine-status"]["global_status"] == "RUNNING"
    await client.disconnect()


async def test_events_follow_the_v2_ui_contract(broadcast_thread):
    client = await connected("/api/ws/events")
    assert await client.nothing()

    def values(frames):
        assert all(f["name"] == "invalidateCache" for f in frames)
        return [f["value"] for f in frames]

    failing = await start(broadcast_thread, "flaky_retry")
    frames = await client.frames_until(lambda f: f["value"] == {"type": "processStatusCounts"})
    pair = [{"type": "processes", "id": "LIST"}, {"type": "processes", "id": failing}]
    # Start, Prepare request, then the failing step with the status counts.
    assert values(frames) == pair * 3 + [{"type": "processStatusCounts"}]

    await sync_to_async(services.resume_process)(
        uuid.UUID(failing), [], resumed_by="t", broadcast=broadcast_thread.broadcast_process
    )
    frames = await client.frames_until(lambda f: f["value"] == {"type": "processStatusCounts"})
    assert values(frames) == pair + [{"type": "processStatusCounts"}]
    # The retried run goes on to its end: let its events pass before the next ones are counted.
    await sync_to_async(wait_until)(
        lambda: Process.objects.get(pk=failing).last_status == "completed", what="the retried run"
    )
    while not await client.nothing():
        await client.frame()

    suspended = await start(broadcast_thread, "confirm_input")
    await client.frames_until(lambda f: f["value"].get("id") == suspended)
    await sync_to_async(services.abort_process)(
        uuid.UUID(suspended), aborted_by="t", broadcast=broadcast_thread.broadcast_process
    )
    await client.frames_until(lambda f: f["value"] == {"type": "processStatusCounts"})
    await sync_to_async(services.delete_process)(
        uuid.UUID(suspended), broadcast=broadcast_thread.broadcast_process
    )
    frames = await client.frames_until(lambda f: f["value"] == {"type": "processStatusCounts"})
    assert values(frames)[-3:] == [
        {"type": "processes", "id": "LIST"},
        {"type": "processes", "id": suspended},
        {"type": "processStatusCounts"},
    ]

    await sync_to_async(engine_lock.set_global_lock)(True)
    frames = await client.frames_until(lambda f: f["value"] == {"type": "engineStatus"})
    assert values(frames) == [{"type": "engineStatus"}]
    await sync_to_async(engine_lock.set_global_lock)(False)
    await client.frames_until(lambda f: f["value"] == {"type": "engineStatus"})
    await client.disconnect()


async def test_delete_announces_a_deleted_process_to_list_and_detail(broadcast_thread):
    process_id = await start(broadcast_thread, "confirm_input")
    detail = await connected(f"/api/processes/{process_id}")
    listing = await connected("/api/processes/all/")
    snapshot = await detail.frame()
    while snapshot["process"]["status"] != "suspended":
        snapshot = await detail.frame()
    await sync_to_async(services.delete_process)(
        uuid.UUID(process_id), broadcast=broadcast_thread.broadcast_process
    )
    expected = {
        "id": process_id,
        "process_id": process_id,
        "status": "aborted",
        "last_status": "aborted",
        "deleted": True,
    }
    listed = await listing.frames_until(lambda f: f["process"].get("deleted"))
    assert listed[-1]["process"] == expected
    gone = await detail.frames_until(lambda f: f["process"].get("deleted"))
    assert gone[-1]["process"] == expected and gone[-1]["close"] is True
    assert await detail.closed_with() == 1000
    await listing.disconnect()


async def test_a_detail_client_resyncing_after_a_delete_is_told_of_the_delete(broadcast_thread):
    """Its snapshot is re-read after the process is gone: the client learns of the deletion,
    as from the live stream, instead of the 404 meant for an id that never existed."""
    process_id = await start(broadcast_thread, "confirm_input")
    detail = await connected(f"/api/processes/{process_id}")
    snapshot = await detail.frame()
    while snapshot["process"]["status"] != "suspended":
        snapshot = await detail.frame()
    await sync_to_async(services.delete_process)(uuid.UUID(process_id), broadcast=lambda *a, **k: None)
    layer = get_channel_layer()
    await layer.group_send(messages.process_detail_group(process_id), messages.RESYNC_MESSAGE)
    gone = (await detail.frames_until(lambda f: f["process"].get("deleted")))[-1]
    assert gone["resync"] is True and gone["close"] is True
    assert gone["process"]["process_id"] == process_id
    assert await detail.closed_with() == 1000


@pytest.mark.parametrize(
    "path", ["/api/processes/all/", "/api/settings/ws-status/", "/api/ws/events", "/api/processes/{id}"]
)
async def test_heartbeat_is_answered_and_other_client_text_is_never_broadcast(broadcast_thread, path):
    process_id = await start(broadcast_thread, "confirm_input")
    await sync_to_async(wait_until)(
        lambda: Process.objects.get(pk=process_id).last_status == "suspended", what="suspended"
    )
    await asyncio.sleep(0.3)  # let the last broadcasts go: from here on nothing changes
    path = path.format(id=process_id)
    client = await connected(path)
    other = await connected(path)
    if path.startswith(("/api/settings", f"/api/processes/{process_id}")):
        assert "seq" in await client.frame() and "seq" in await other.frame()  # snapshots
    await client.send("__ping__")
    assert await client.text() == "__pong__"
    await client.send('{"process": "forged"}')
    await client.send("hello")
    await client.send("__ping__")
    assert await client.text() == "__pong__"
    assert await other.nothing(0.5)  # what a client says reaches nobody
    assert await client.nothing(0.2)
    await client.disconnect()
    await other.disconnect()


class TestAuthentication:
    @pytest.fixture(autouse=True)
    def auth_on(self, settings):
        settings.WS_AUTH_REQUIRED = True
        settings.WS_AUTH_TOKENS = ["s3cret", "other-token"]

    @pytest.mark.parametrize("path", ["/api/processes/all/", "/api/settings/ws-status/"])
    async def test_legacy_endpoints_take_the_token_in_the_query(self, broadcast_thread, path):
        client = await connected(f"{path}?token=s3cret")
        await client.send("__ping__")
        assert "__pong__" in {await client.text() for _ in range(2 if "ws-status" in path else 1)}
        await client.disconnect()

    @pytest.mark.parametrize("query", ["", "?token=wrong", "?token="])
    async def test_bad_or_missing_token_gets_401_then_1008(self, broadcast_thread, query):
        client = await connected(f"/api/processes/all/{query}")
        assert await client.frame() == {"error": {"status_code": 401, "detail": "Unauthorized"}}
        assert await client.closed_with() == 1008

    async def test_events_take_the_token_as_subprotocol_and_echo_it(self, broadcast_thread):
        client = WsClient("/api/ws/events", subprotocols=["base64.bearer.token", "other-token"])
        ok, subprotocol = await client.connect()
        assert ok and subprotocol == "base64.bearer.token"
        await client.send("__ping__")
        assert await client.text() == "__pong__"
        await client.disconnect()

    async def test_events_with_a_bad_token_get_401_then_1008(self, broadcast_thread):
        client = WsClient("/api/ws/events", subprotocols=["base64.bearer.token", "nope"])
        ok, subprotocol = await client.connect()
        assert ok and subprotocol == "base64.bearer.token"
        assert await client.frame() == {"error": {"status_code": 401, "detail": "Unauthorized"}}
        assert await client.closed_with() == 1008

    @pytest.mark.parametrize(
        "subprotocols",
        [["base64.bearer.token"], ["bearer", "s3cret"], ["base64.bearer.token", "s3cret", "x"], ["s3cret"]],
    )
    async def test_malformed_subprotocol_header_rejects_the_handshake(self, broadcast_thread, subprotocols):
        client = WsClient("/api/ws/events", subprotocols=subprotocols)
        ok, _ = await client.connect()
        assert not ok


async def test_events_echo_the_bearer_subprotocol_with_auth_off(broadcast_thread):
    client = WsClient("/api/ws/events", subprotocols=["base64.bearer.token", "anything"])
    ok, subprotocol = await client.connect()
    assert ok and subprotocol == "base64.bearer.token"
    await client.disconnect()


async def test_messages_arrive_in_broadcast_order_for_many_processes(broadcast_thread):
    listing = await connected("/api/processes/all/")
    ids = [await start(broadcast_thread, "quick_steps") for _ in range(6)]
    frames = [await listing.frame() for _ in range(6 * 6)]
    assert await listing.nothing()
    assert seqs(frames) == list(range(frames[0]["seq"], frames[0]["seq"] + len(frames)))
    for process_id in ids:
        mine = [f["process"] for f in frames if f["process"]["id"] == process_id]
        assert len(mine) == 6 and mine[-1]["status"] == "completed"
    await listing.disconnect()


async def test_since_replays_missed_messages_exactly_once(broadcast_thread):
    listing = await connected("/api/processes/all/")
    first = await start(broadcast_thread, "quick_steps")
    frames = [await listing.frame() for _ in range(6)]
    await listing.disconnect()
    last_seen = frames[2]["seq"]

    rejoined = await connected(f"/api/processes/all/?since={last_seen}")
    replayed = await rejoined.frames_until(lambda f: f["seq"] == frames[-1]["seq"])
    assert replayed == frames[3:]
    second = await start(broadcast_thread, "quick_steps")
    live = [await rejoined.frame() for _ in range(6)]
    assert {f["process"]["id"] for f in live} == {second} != {first}
    assert live[0]["seq"] == frames[-1]["seq"] + 1
    await rejoined.disconnect()


@pytest.mark.parametrize("since", ["-1", "abc", "1.5"])
async def test_malformed_since_gets_400_and_4400(broadcast_thread, since):
    client = await connected(f"/api/processes/all/?since={since}")
    frame = await client.frame()
    assert frame["error"]["status_code"] == 400 and "since" in frame["error"]["detail"]
    assert await client.closed_with() == 4400


async def test_detail_of_a_finished_process_is_one_closing_snapshot(broadcast_thread):
    process_id = await start(broadcast_thread, "quick_steps")
    await sync_to_async(wait_until)(
        lambda: Process.objects.get(pk=process_id).last_status == "completed", what="completion"
    )
    client = await connected(f"/api/processes/{process_id}")
    snapshot = await client.frame()
    assert snapshot["process"]["status"] == "completed" and snapshot["close"] is True
    assert await client.closed_with() == 1000


class BatchRecorder:
    """A transport that takes (or refuses) batches and keeps what it took."""

    def __init__(self, takes: bool = True):
        self.takes = takes
        self.written: list[bytes] = []

    def send_batch(self, wire: bytes) -> bool:
        if self.takes:
            self.written.append(wire)
        return self.takes


def in_step_consumer(transport, last_seq: int = 10):
    consumer = GroupConsumer()
    consumer.group, consumer.transport, consumer.last_seq = "g", transport, last_seq
    return consumer


def batch_after(after: int, *seqs: int):
    batch = Batch(after)
    for seq in seqs:
        batch.add(stamp({"type": "group.frame", "text": f'{{"n":{seq}}}'}, seq))
    return batch


def test_a_client_in_step_takes_a_batch_in_one_write_and_moves_on_to_its_last_seq():
    transport = BatchRecorder()
    consumer = in_step_consumer(transport)
    batch = batch_after(10, 11, 12)
    assert consumer.deliver_batch("g", batch)
    assert transport.written == [batch.wire] and consumer.last_seq == 12


@pytest.mark.parametrize("state", ["behind", "syncing", "closing", "transport refuses", "no seq yet"])
def test_a_client_not_in_step_gets_the_batch_one_message_at_a_time(state):
    transport = BatchRecorder(takes=state != "transport refuses")
    consumer = in_step_consumer(transport, last_seq={"behind": 9, "no seq yet": None}.get(state, 10))
    consumer._buffer = [] if state == "syncing" else None
    consumer._closing = state == "closing"
    assert not consumer.deliver_batch("g", batch_after(10, 11, 12))
    assert transport.written == []
    assert consumer.last_seq == {"behind": 9, "no seq yet": None}.get(state, 10)
