"""The fan-out channel layers: sequence numbers, history, local fan-out, threads, Redis outages."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import pytest
import redis
import redis.asyncio as aioredis

from orchestrator_ws.realtime.layers import Hub, InMemoryFanoutLayer, contiguous, stamp
from orchestrator_ws.realtime.redis_layer import PUBLISH_SCRIPT_SHA, RedisFanoutLayer, SubscribedGroups
from orchestrator_ws.realtime.transport import TextFrame
from tests.servers import RedisServer


class Member:
    """A GroupMember that records what the hub hands it."""

    def __init__(self):
        self.messages: list[dict] = []
        self.lost: list[str] = []

    def deliver(self, group, message):
        self.messages.append(message)

    def deliver_batch(self, group, batch):
        return False  # one by one, through deliver

    def messages_may_be_lost(self, group):
        self.lost.append(group)


class BatchMember(Member):
    """A member that takes batches (as a client in step does) and records each one."""

    def __init__(self):
        super().__init__()
        self.batches: list[tuple[int, int, bytes]] = []

    def deliver_batch(self, group, batch):
        self.batches.append((batch.after, batch.last, batch.wire))
        self.messages.extend(batch.messages)
        return True


def frame(n: int, **extra) -> dict:
    return {"type": "group.frame", "text": f'{{"n":{n}}}', **extra}


def hub_with(**members) -> tuple[Hub, dict[str, asyncio.Queue]]:
    queues: dict[str, asyncio.Queue] = {}
    hub = Hub(lambda channel: queues.setdefault(channel, asyncio.Queue()))
    for channel, member in members.items():
        hub.add("g", channel)
        if member is not None:
            hub.members[channel] = member
    hub.latest["g"] = 10
    return hub, queues


async def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_stamp_puts_seq_first_in_a_json_text_and_in_the_message():
    message = {"type": "group.frame", "text": '{"a":1}'}
    assert stamp(message, 7) == {"type": "group.frame", "text": '{"seq":7,"a":1}', "seq": 7}
    assert stamp({"type": "group.frame", "text": "{}"}, 2)["text"] == '{"seq":2}'
    assert stamp({"type": "x.y", "n": 1}, 3) == {"type": "x.y", "n": 1, "seq": 3}
    assert message == {"type": "group.frame", "text": '{"a":1}'}  # not mutated


def test_contiguous_refuses_gaps_expiry_and_a_reset_counter():
    now = time.time()
    entries = [(seq, now, {"type": "t", "n": seq}) for seq in range(3, 8)]
    assert [m["seq"] for m in contiguous(4, 7, entries, ttl=60)] == [5, 6, 7]
    assert contiguous(1, 7, entries, ttl=60) is None  # seq 2 is gone
    assert contiguous(4, 7, [e for e in entries if e[0] != 6], ttl=60) is None
    assert contiguous(4, 7, [(s, now - 120, m) for s, now_, m in entries], ttl=60) is None
    assert contiguous(9, 7, entries, ttl=60) is None  # the client saw more than exists: reset
    assert contiguous(7, 7, entries, ttl=60) == []


@pytest.fixture(params=["memory", "redis"])
async def layer(request):
    if request.param == "memory":
        yield InMemoryFanoutLayer(history_size=50, history_ttl=60)
        return
    layer = RedisFanoutLayer(
        url=request.getfixturevalue("redis_url"),
        prefix=f"layer-test-{uuid.uuid4().hex[:8]}",
        history_size=50,
        history_ttl=60,
    )
    yield layer
    await layer.close()


async def joined(layer, group, member=None):
    channel = await layer.new_channel()
    await layer.group_add(group, channel)
    if member is not None:
        layer.attach(channel, member)
    return channel


async def test_group_send_numbers_messages_and_fans_out_to_every_local_member(layer):
    members = [Member() for _ in range(3)]
    for member in members:
        await joined(layer, "g", member)
    for n in range(5):
        await layer.group_send("g", {"type": "group.frame", "text": f'{{"n":{n}}}'})
    await wait_for(lambda: all(len(m.messages) == 5 for m in members))
    for member in members:
        assert [m["seq"] for m in member.messages] == [1, 2, 3, 4, 5]
        assert [m["text"] for m in member.messages] == [f'{{"seq":{n + 1},"n":{n}}}' for n in range(5)]
    # Encoded once, stamped once per server process: every member got the very same object.
    assert members[0].messages[0] is members[1].messages[0] is members[2].messages[0]
    assert await layer.group_seq("g") == 5
    assert await layer.group_seq("other") == 0


async def test_members_without_a_sink_receive_through_their_channel(layer):
    channel = await joined(layer, "g")
    await layer.group_send("g", {"type": "chat.message", "body": "hi"})
    received = await asyncio.wait_for(layer.receive(channel), 5)
    assert received == {"type": "chat.message", "body": "hi", "seq": 1}


async def test_discarded_members_get_nothing_more(layer):
    member = Member()
    channel = await joined(layer, "g", member)
    await layer.group_send("g", {"type": "group.frame", "text": "{}"})
    await wait_for(lambda: len(member.messages) == 1)
    await layer.group_discard("g", channel)
    await layer.group_send("g", {"type": "group.frame", "text": "{}"})
    await asyncio.sleep(0.2)
    assert len(member.messages) == 1


async def test_history_replays_after_a_seq_and_knows_when_it_cannot(layer):
    for n in range(60):
        await layer.group_send("h", {"type": "group.frame", "text": f'{{"n":{n}}}'})
    history = await layer.group_history("h", 55)
    assert history.seq == 60 and history.complete
    assert [m["seq"] for m in history.messages] == [56, 57, 58, 59, 60]
    assert history.messages[0]["text"] == '{"seq":56,"n":55}'
    assert (await layer.group_history("h", 60)).messages == []
    # 60 messages, history of 50: the first ten are gone.
    assert not (await layer.group_history("h", 3)).complete
    assert not (await layer.group_history("h", 61)).complete


async def test_group_send_from_other_threads_and_loops_keeps_seq_order(layer):
    member = Member()
    await joined(layer, "t", member)
    per_thread = 50

    def sender(name):
        async def send_all():
            for n in range(per_thread):
                await layer.group_send("t", {"type": "group.frame", "text": f'{{"t":"{name}","n":{n}}}'})
            if hasattr(layer, "close"):
                await layer.close()

        asyncio.run(send_all())

    threads = [threading.Thread(target=sender, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    await wait_for(lambda: len(member.messages) == 4 * per_thread)
    assert [m["seq"] for m in member.messages] == list(range(1, 4 * per_thread + 1))
    for i in range(4):
        mine = [m["text"] for m in member.messages if f'"t":"w{i}"' in m["text"]]
        assert [int(text.rsplit(":", 1)[1][:-1]) for text in mine] == list(range(per_thread))


async def test_group_send_many_is_one_ordered_batch(layer):
    member = Member()
    await joined(layer, "a", member)
    await joined(layer, "b", member)
    seqs = await layer.group_send_many(
        [
            ("a", {"type": "group.frame", "text": "{}"}),
            ("b", {"type": "group.frame", "text": "{}"}),
            ("a", {"type": "group.frame", "text": "{}"}),
        ]
    )
    assert seqs == [1, 1, 2]
    await wait_for(lambda: len(member.messages) == 3)


async def test_a_batch_is_sent_once_when_redis_has_lost_the_publish_script(redis_url):
    """The publish script runs by its digest; after SCRIPT FLUSH (or a Redis restart) the batch
    is refused as a whole, the script is loaded and the batch goes out exactly once."""
    layer = RedisFanoutLayer(url=redis_url, prefix=f"noscript-{uuid.uuid4().hex[:8]}")
    member = Member()
    await joined(layer, "g", member)
    await layer.group_send("g", {"type": "group.frame", "text": '{"n":1}'})
    admin = redis.Redis.from_url(redis_url)
    try:
        admin.script_flush()
        assert admin.script_exists(PUBLISH_SCRIPT_SHA) == [False]
        seqs = await layer.group_send_many(
            [("g", {"type": "group.frame", "text": f'{{"n":{n}}}'}) for n in (2, 3)]
        )
        assert seqs == [2, 3]
        assert admin.script_exists(PUBLISH_SCRIPT_SHA) == [True]
    finally:
        admin.close()
    await wait_for(lambda: len(member.messages) == 3)
    await asyncio.sleep(0.2)
    assert [m["text"] for m in member.messages] == ['{"seq":1,"n":1}', '{"seq":2,"n":2}', '{"seq":3,"n":3}']
    history = await layer.group_history("g", 0)
    assert [m["seq"] for m in history.messages] == [1, 2, 3]
    await layer.close()


def redis_client_count(url) -> int:
    client = redis.Redis.from_url(url)
    try:
        return len(client.client_list())
    finally:
        client.close()


async def test_redis_layer_leaves_no_connection_behind(redis_url):
    before = redis_client_count(redis_url)
    layer = RedisFanoutLayer(url=redis_url, prefix=f"leak-{uuid.uuid4().hex[:8]}")
    member = Member()
    channel = await joined(layer, "g", member)

    def thread_sends():
        async def send():
            for _ in range(20):
                await layer.group_send("g", {"type": "group.frame", "text": "{}"})
            await layer.close()

        asyncio.run(send())

    threads = [threading.Thread(target=thread_sends) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    await wait_for(lambda: len(member.messages) == 60)
    assert redis_client_count(redis_url) > before  # the subscription and this loop's pool
    await layer.group_discard("g", channel)
    await layer.close()
    await wait_for(lambda: redis_client_count(redis_url) == before)


async def test_redis_outage_is_reported_to_members_and_the_subscription_comes_back():
    server = RedisServer().start()
    try:
        layer = RedisFanoutLayer(url=server.url, prefix="outage", command_timeout=0.5, ping_interval=0.3)
        member = Member()
        await joined(layer, "g", member)
        await layer.group_send("g", {"type": "group.frame", "text": "{}"})
        await wait_for(lambda: len(member.messages) == 1)

        server.stop()
        await asyncio.sleep(0.5)
        with pytest.raises((redis.RedisError, OSError, TimeoutError)):
            await layer.group_send("g", {"type": "group.frame", "text": "{}"})
        server.start()  # same port, empty: the history and the seq counters are gone

        await wait_for(lambda: member.lost == ["g"], timeout=10)
        assert layer.reconnects == 1
        await layer.group_send("g", {"type": "group.frame", "text": "{}"})
        await wait_for(lambda: len(member.messages) == 2)
        assert member.messages[-1]["seq"] == 1  # the counter restarted with Redis...
        assert not (await layer.group_history("g", 1 + 1)).complete  # ...and a client at seq 2 resyncs
        await layer.close()
    finally:
        server.stop()


async def test_commands_after_a_redis_restart_do_not_fail_on_old_pooled_connections():
    server = RedisServer().start()
    try:
        layer = RedisFanoutLayer(url=server.url, prefix="restart", command_timeout=0.5)
        await asyncio.gather(*(layer.group_seq("g") for _ in range(4)))  # four pooled connections
        server.stop()
        server.start()
        await asyncio.sleep(0.2)
        for _ in range(8):
            assert await layer.group_seq("g") == 0
        await layer.close()
    finally:
        server.stop()


async def test_closing_the_layer_while_its_reader_cleans_up_after_a_failure_ends_the_reader(monkeypatch):
    server = RedisServer().start()
    try:
        layer = RedisFanoutLayer(url=server.url, prefix="cleanup", command_timeout=0.5, ping_interval=0.3)
        await joined(layer, "g", Member())
        cleaning = asyncio.Event()
        close_pubsub = aioredis.client.PubSub.aclose

        async def slow_close(pubsub):
            cleaning.set()
            await asyncio.sleep(0.3)  # the close is cancelled in here
            await close_pubsub(pubsub)

        monkeypatch.setattr(aioredis.client.PubSub, "aclose", slow_close)
        server.stop()  # the reader's connection fails; it closes it before reconnecting
        await asyncio.wait_for(cleaning.wait(), 5)
        closing = asyncio.ensure_future(layer.close())
        done, _ = await asyncio.wait({closing}, timeout=2)
        if not done:
            server.start()  # a reader that swallowed the cancel reconnects: cancel it there
            layer._reader.cancel()
            await closing
        assert done, "the reader went on reconnecting after the layer was closed"
    finally:
        server.stop()


async def test_a_paused_redis_is_detected_by_missed_pings():
    server = RedisServer().start()
    try:
        layer = RedisFanoutLayer(url=server.url, prefix="paused", command_timeout=0.5, ping_interval=0.3)
        member = Member()
        await joined(layer, "g", member)
        server.pause()
        began = time.monotonic()
        with pytest.raises((redis.RedisError, OSError, TimeoutError)):
            await layer.group_send("g", {"type": "group.frame", "text": "{}"})
        assert time.monotonic() - began < 2  # commands time out: no loop is blocked for long
        await asyncio.sleep(1.5)
        server.resume()
        await wait_for(lambda: member.lost == ["g"], timeout=10)
        await layer.close()
    finally:
        server.resume()
        server.stop()


def pubsub_calls(admin: redis.Redis) -> int:
    """PUBSUB commands (NUMSUB, CHANNELS) the server has answered so far."""
    stats = admin.info("commandstats")
    return sum(stat["calls"] for name, stat in stats.items() if name.startswith("cmdstat_pubsub"))


@pytest.fixture
def private_redis():
    """A Redis of the test's own: its command counts and clients are the test's alone."""
    server = RedisServer().start()
    admin = redis.Redis.from_url(server.url)
    yield server, admin
    admin.close()
    server.stop()


async def test_server_processes_hear_of_each_others_subscriptions_instead_of_asking(private_redis):
    server, admin = private_redis
    # Reloads far apart: after the first load, what is learnt is learnt from announcements.
    # The prefix has glob characters: the load's pattern must match them literally.
    here, there = (RedisFanoutLayer(url=server.url, prefix="w[1]?", subscriptions_reload=60) for _ in "ab")
    await joined(there, "detail.1")  # before here listens: found by here's load
    await joined(here, "list")
    await wait_for(lambda: here.subscribed.known == {"list", "detail.1"})
    await joined(there, "detail.2")  # announced
    await wait_for(lambda: here.subscribed.known == {"list", "detail.1", "detail.2"})

    asked = pubsub_calls(admin)
    for _ in range(20):
        assert await here.watched(["list", "detail.2", "detail.3"]) == {"list", "detail.2"}
    assert pubsub_calls(admin) == asked  # no round trip per question

    # A member of this process counts from its group_add on, before Redis confirmed anything.
    member = Member()
    channel = await here.new_channel()
    here.attach(channel, member)
    adding = asyncio.create_task(here.group_add("detail.3", channel))
    await asyncio.sleep(0)
    assert await here.watched(["detail.3", "detail.4"]) == {"detail.3"}
    await adding

    admin.publish("w[1]?:control", "not an announcement")  # logged and ignored
    await there.group_send("detail.3", frame(1))
    await wait_for(lambda: len(member.messages) == 1)  # the reader went on
    await here.close()
    await there.close()


async def test_a_group_nobody_follows_any_more_drops_out_at_the_next_reload(private_redis):
    server, _ = private_redis
    here, there = (RedisFanoutLayer(url=server.url, prefix="drop", subscriptions_reload=0.2) for _ in "ab")
    await joined(here, "list")
    channel = await joined(there, "detail.1")
    await wait_for(lambda: "detail.1" in (here.subscribed.known or ()))
    await there.group_discard("detail.1", channel)
    await wait_for(lambda: here.subscribed.known == {"list"}, timeout=3)
    assert await here.watched(["list", "detail.1"]) == {"list"}
    await here.close()
    await there.close()


async def test_without_a_subscription_connection_watched_asks_redis(private_redis):
    server, admin = private_redis
    follower = RedisFanoutLayer(url=server.url, prefix="ask")
    await joined(follower, "detail.1")
    asker = RedisFanoutLayer(url=server.url, prefix="ask")  # no member: hears no announcement
    asked = pubsub_calls(admin)
    assert await asker.watched(["detail.1", "detail.2"]) == {"detail.1"}
    assert pubsub_calls(admin) == asked + 1  # PUBSUB NUMSUB
    await asker.close()
    await follower.close()


async def test_after_a_lost_subscription_connection_the_groups_are_known_again(private_redis):
    server, admin = private_redis
    here, there = (
        RedisFanoutLayer(url=server.url, prefix="lost", subscriptions_reload=60, ping_interval=0.3)
        for _ in "ab"
    )
    await joined(here, "list")
    await joined(there, "detail.1")
    await wait_for(lambda: here.subscribed.known == {"list", "detail.1"})
    admin.client_kill_filter(_type="pubsub")
    await wait_for(lambda: here.reconnects == 1 and there.reconnects == 1, timeout=10)
    await wait_for(lambda: here.subscribed.known == {"list", "detail.1"})
    assert await here.watched(["detail.1", "detail.2"]) == {"detail.1"}
    await here.close()
    await there.close()


async def test_flush_deletes_its_own_prefix_only_even_one_with_glob_characters(private_redis):
    server, _ = private_redis
    globbing, other = (
        RedisFanoutLayer(url=server.url, prefix="f?"),
        RedisFanoutLayer(url=server.url, prefix="fx"),
    )
    for layer in (globbing, other):
        await layer.group_send("g", frame(1))
    await globbing.flush()
    assert await globbing.group_seq("g") == 0
    assert await other.group_seq("g") == 1  # "f?" as a pattern would have matched "fx"
    await globbing.close()
    await other.close()


def test_subscribed_groups_keep_what_is_announced_while_a_load_is_on_its_way():
    groups = SubscribedGroups()
    assert groups.among(["a"]) is None  # unknown: the caller asks Redis
    groups.announced(["a"])
    assert groups.among(["a"]) is None
    groups.loading()
    groups.announced(["b"])  # subscribed after Redis answered the load, heard before its reply
    groups.loaded(["a"])
    assert groups.among(["a", "b", "c"]) == {"a", "b"}
    groups.loading()
    groups.loaded(["b"])  # a's last subscriber left
    assert groups.among(["a", "b"]) == {"b"}
    groups.forget()
    assert groups.among(["b"]) is None


async def test_the_frames_of_one_loop_iteration_reach_a_member_as_one_batch():
    taker, one_by_one = BatchMember(), Member()
    hub, queues = hub_with(a=taker, b=one_by_one, c=None)
    for seq in (11, 12, 13):
        hub.dispatch("g", seq, frame(seq))
    assert taker.messages == [] and one_by_one.messages == []  # not before the iteration ends
    await asyncio.sleep(0)
    wire = b"".join(TextFrame(f'{{"seq":{seq},"n":{seq}}}').wire for seq in (11, 12, 13))
    assert taker.batches == [(10, 13, wire)]
    assert [m["seq"] for m in one_by_one.messages] == [11, 12, 13]
    assert [queues["c"].get_nowait()["seq"] for _ in range(3)] == [11, 12, 13]


async def test_a_resync_a_closing_frame_or_a_gap_goes_out_after_the_batch_before_it():
    taker = BatchMember()
    hub, _ = hub_with(a=taker)
    hub.dispatch("g", 11, frame(11))
    hub.dispatch("g", 12, {"type": "group.resync"})
    hub.dispatch("g", 13, frame(13))
    hub.dispatch("g", 14, frame(14, close=True))
    hub.dispatch("g", 16, frame(16))  # 15 never came
    hub.dispatch("g", 17, frame(17))
    await asyncio.sleep(0)
    assert [m["seq"] for m in taker.messages] == [11, 12, 13, 14, 16, 17]
    # Batches: 11 and 13 alone (a resync and a closing frame follow them), 17 after the gap;
    # 12, 14 and 16 went through deliver, where the member checks them.
    assert [(after, last) for after, last, _ in taker.batches] == [(10, 11), (12, 13), (16, 17)]


async def test_a_member_joining_mid_iteration_gets_only_what_follows_its_join():
    early, late = BatchMember(), BatchMember()
    hub, _ = hub_with(a=early)
    hub.dispatch("g", 11, frame(11))
    hub.add("g", "b")
    hub.members["b"] = late
    hub.dispatch("g", 12, frame(12))
    await asyncio.sleep(0)
    assert [m["seq"] for m in early.messages] == [11, 12]
    assert [m["seq"] for m in late.messages] == [12]


async def test_a_message_that_does_not_follow_the_batch_waits_for_it():
    member = BatchMember()
    hub, _ = hub_with(a=member)
    hub.dispatch("g", 11, frame(11))
    hub.latest["g"] = 12  # a subscription read a newer seq than was dispatched here
    hub.dispatch("g", 13, frame(13))
    await asyncio.sleep(0)
    assert [m["seq"] for m in member.messages] == [11, 13]
