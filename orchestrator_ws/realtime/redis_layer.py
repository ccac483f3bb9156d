"""The fan-out layer shared by every server process through Redis.

One ``group_send`` is one Lua script run: it takes the group's next sequence number, appends the
message to the group's history stream (trimmed to ``history_size``, expiring after
``history_ttl`` of silence) and publishes it, atomically, so every subscriber sees a group's
messages in ``seq`` order. The broadcast thread sends a batch in one pipelined round trip.

Each server process holds **one** pub/sub connection (not one per client) subscribed to the
groups that have local members; its reader task hands each message to the hub, which stamps it
once and delivers it to the local members. If the connection drops or Redis stops answering its
pings, the reader reconnects with backoff, re-subscribes every group by itself and tells the
members that messages may have been lost, so each catches up from the history or resyncs.

The same connection follows a control channel on which every server process announces the
groups it subscribes to, so each knows which groups are followed anywhere (``watched``) without
asking Redis before every broadcast (see :class:`SubscribedGroups`).

Every Redis command has a timeout (``command_timeout``): a paused Redis blocks no event loop
for longer than that.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError
from redis.maint_notifications import MaintNotificationsConfig

from orchestrator_ws.realtime.layers import FanoutChannelLayer, History, Message, contiguous
from orchestrator_ws.realtime.metrics import REDIS_RECONNECTS

logger = logging.getLogger(__name__)

# KEYS: seq key, history stream. ARGV: pub/sub channel, message, history size,
# history ttl (ms), seq ttl (ms). Returns the message's seq.
PUBLISH_SCRIPT = """
local seq = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 's', seq, 'm', ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('PUBLISH', ARGV[1], seq .. ':' .. ARGV[2])
return seq
"""

# KEYS: seq key, history stream. ARGV: after (-1: seq only), history size.
# Returns {seq} or {seq, entries newest first}; no entries when the range cannot be covered.
HISTORY_SCRIPT = """
local seq = tonumber(redis.call('GET', KEYS[1]) or '0')
local after = tonumber(ARGV[1])
if after < 0 or after >= seq or seq - after > tonumber(ARGV[2]) then
  return {seq}
end
return {seq, redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', seq - after)}
"""

_FAILURES = (RedisError, OSError, asyncio.TimeoutError)


# The publish script runs by its digest (see RedisFanoutLayer._publish_by_sha).
PUBLISH_SCRIPT_SHA = hashlib.sha1(PUBLISH_SCRIPT.encode(), usedforsecurity=False).hexdigest()


class SubscribedGroups:
    """The groups some server process subscribes to, as this process last heard.

    The broadcast thread asks before every batch which detail groups anyone follows; a round
    trip to Redis for it (PUBSUB NUMSUB) cost the batch a wait for the reply and another for
    the GIL of a busy server process. So the answer is kept here: loaded with PUBSUB CHANNELS,
    reloaded every so often, and told at once of every new subscription through the control
    channel. Groups nobody follows any more drop out at the next reload.

    Being wrong is safe either way. A group listed after its last subscriber left costs building
    a detail nobody reads, until the reload. A group subscribed but not yet announced here (a
    millisecond, or a lost announcement until the reload) gets a ``group.resync`` in place of
    the detail, and the detail endpoint sends its clients the fresh state instead.

    The home loop writes it and the broadcast thread reads it: ``known`` is only replaced whole
    or added to, and readers only test membership.
    """

    def __init__(self) -> None:
        self.known: set[str] | None = None  # None: unknown (no subscription connection)
        self._heard_while_loading: set[str] | None = None

    def loading(self) -> None:
        """A load is on its way: what is announced until it arrives is added to it."""
        self._heard_while_loading = set()

    def loaded(self, groups: Iterable[str]) -> None:
        heard = self._heard_while_loading or set()
        self._heard_while_loading = None
        self.known = {*groups, *heard}

    def announced(self, groups: Iterable[str]) -> None:
        groups = set(groups)
        if self._heard_while_loading is not None:
            self._heard_while_loading |= groups
        if self.known is not None:
            self.known |= groups

    def forget(self) -> None:
        """Announcements can no longer be heard (the connection dropped): stop answering."""
        self.known = None
        self._heard_while_loading = None

    def among(self, groups: Iterable[str]) -> set[str] | None:
        """The followed ones among ``groups``; None while unknown."""
        known = self.known
        return None if known is None else {group for group in groups if group in known}


def _starting_with(text: str) -> str:
    """A Redis glob pattern for the names that start with ``text`` (its glob characters taken
    literally: a prefix such as ``app[1]`` must not match ``app1``'s keys or channels)."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text) + "*"


@dataclass
class _LoopClient:
    """A command connection pool, and the history script bound to it, for one event loop."""

    redis: aioredis.Redis
    history: object


class RedisFanoutLayer(FanoutChannelLayer):
    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        prefix: str = "orchestrator-ws",
        command_timeout: float = 2.0,
        ping_interval: float = 2.0,
        seq_ttl: float = 86400,
        max_connections: int = 64,
        subscriptions_reload: float = 5.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.url = url
        self.prefix = prefix
        self.command_timeout = command_timeout
        self.ping_interval = ping_interval
        self.seq_ttl = seq_ttl
        self.max_connections = max_connections
        self.subscriptions_reload = subscriptions_reload
        # One command client per event loop (consumers' loop, the broadcast thread's loop).
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopClient] = (
            weakref.WeakKeyDictionary()
        )
        # Subscribed to by every server process: it keeps the subscription connection up
        # whatever the groups, and carries the announcements of new subscriptions.
        self._control_channel = f"{prefix}:control"
        self._pubsub = None
        self._reader: asyncio.Task | None = None
        self._confirmations: dict[str, list[asyncio.Future]] = {}
        self.subscribed = SubscribedGroups()
        self._loader: asyncio.Task | None = None
        self._unannounced: set[str] = set()
        self._announcer: asyncio.Task | None = None
        self.reconnects = 0

    # --- naming -----------------------------------------------------------------------------------

    def _keys(self, group: str) -> list[str]:
        # The hash tag keeps a group's keys in one slot (Redis Cluster, and the scripts).
        return [f"{self.prefix}:{{{group}}}:seq", f"{self.prefix}:{{{group}}}:history"]

    def _channel(self, group: str) -> str:
        return f"{self.prefix}:group:{group}"

    def _group_of(self, channel: bytes | str) -> str:
        name = channel.decode() if isinstance(channel, bytes) else channel
        return name.removeprefix(f"{self.prefix}:group:")

    # --- command side ---------------------------------------------------------------------------

    def _new_client(self, **options) -> aioredis.Redis:
        return aioredis.Redis.from_url(
            self.url,
            socket_connect_timeout=self.command_timeout,
            retry=Retry(NoBackoff(), 0),
            **options,
        )

    def _client(self) -> _LoopClient:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            pool = aioredis.BlockingConnectionPool.from_url(
                self.url,
                max_connections=self.max_connections,
                timeout=self.command_timeout,
                socket_timeout=self.command_timeout,
                socket_connect_timeout=self.command_timeout,
                retry=Retry(NoBackoff(), 0),
                # With maintenance notifications on (redis-py's default over RESP3) the pool
                # hands out a connection without checking it, so after a Redis restart each
                # idle connection failed the next command sent on it. Off, the pool sees the
                # closed socket and reconnects first.
                maint_notifications_config=MaintNotificationsConfig(enabled=False),
            )
            redis = aioredis.Redis(connection_pool=pool)
            client = self._clients[loop] = _LoopClient(redis, redis.register_script(HISTORY_SCRIPT))
        return client

    async def _publish(self, messages: list[tuple[str, Message]]) -> list[int]:
        client = self._client()
        try:
            return await self._publish_by_sha(client, messages)
        except NoScriptError:
            # Redis lost its scripts (a restart, SCRIPT FLUSH): the batch's EVALSHAs were all
            # refused, none ran, so the batch is sent again once the script is loaded. (Only a
            # SCRIPT FLUSH landing inside the batch could let its first messages run and go out
            # twice, under new seqs; the dashboard merges a repeated step by its step_id.)
            async with asyncio.timeout(self.command_timeout):
                await client.redis.script_load(PUBLISH_SCRIPT)
            return await self._publish_by_sha(client, messages)

    async def _publish_by_sha(self, client: _LoopClient, messages: list[tuple[str, Message]]) -> list[int]:
        """One pipelined round trip of EVALSHAs.

        Not through redis-py's script support in pipelines: that sends SCRIPT EXISTS before
        every batch, a second round trip on the broadcast's path (and a second wait for this
        thread's turn at a busy server process's GIL).
        """
        pipe = client.redis.pipeline(transaction=False)
        history_ttl_ms, seq_ttl_ms = int(self.history_ttl * 1000), int(self.seq_ttl * 1000)
        for group, message in messages:
            seq_key, history_key = self._keys(group)
            pipe.evalsha(
                PUBLISH_SCRIPT_SHA,
                2,
                seq_key,
                history_key,
                self._channel(group),
                self.encode(message),
                self.history_size,
                history_ttl_ms,
                seq_ttl_ms,
            )
        async with asyncio.timeout(self.command_timeout * 2):
            return [int(seq) for seq in await pipe.execute()]

    async def group_history(self, group: str, after: int | None) -> History:
        client = self._client()
        async with asyncio.timeout(self.command_timeout * 2):
            reply = await client.history(
                keys=self._keys(group), args=[-1 if after is None else after, self.history_size]
            )
        current = int(reply[0])
        if after is None:
            return History(current, [])
        if after == current:
            return History(current, [])
        if len(reply) < 2:
            return History(current, None)
        entries = []
        for entry_id, fields in reversed(reply[1]):
            values = dict(zip(fields[::2], fields[1::2], strict=True))
            created = int(entry_id.split(b"-", 1)[0]) / 1000
            entries.append((int(values[b"s"]), created, self.decode(values[b"m"])))
        return History(current, contiguous(after, current, entries, self.history_ttl))

    async def watched(self, groups: list[str]) -> set[str]:
        """Groups with a subscriber on any server process: this one's, and the others' as they
        announced them (``subscribed``); with PUBSUB NUMSUB (one round trip) while this process
        has no subscription connection to hear announcements on."""
        known = self.subscribed.among(groups)
        if known is None:
            async with asyncio.timeout(self.command_timeout):
                counts = await self._client().redis.pubsub_numsub(*(self._channel(g) for g in groups))
            known = {self._group_of(channel) for channel, count in counts if count}
        return known | await super().watched(groups)

    async def flush(self) -> None:
        await super().flush()
        redis = self._client().redis
        async for key in redis.scan_iter(match=_starting_with(f"{self.prefix}:")):
            await redis.delete(key)

    async def close(self) -> None:
        """Release what this layer holds on the running loop (its client, its reader)."""
        await super().close()
        loop = asyncio.get_running_loop()
        if loop is self.home_loop:
            for task in (self._reader, self._loader, self._announcer):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            self._reader = self._loader = self._announcer = None
        client = self._clients.pop(loop, None)
        if client is not None:
            await client.redis.aclose(close_connection_pool=True)

    # --- subscription side ----------------------------------------------------------------------

    async def _subscribe(self, group: str) -> None:
        """Subscribe and wait (bounded) until Redis confirms, so no message slips past a joiner."""
        channel = self._channel(group)
        confirmed = asyncio.get_running_loop().create_future()
        self._confirmations.setdefault(channel, []).append(confirmed)
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read_forever(), name="redis-fanout-reader")
        elif self._pubsub is not None:
            # On failure the reader reconnects and subscribes every group with local members.
            with contextlib.suppress(*_FAILURES):
                await self._pubsub.subscribe(channel)
        try:
            async with asyncio.timeout(self.command_timeout):
                await asyncio.shield(confirmed)
                # Subscribed: from here every message reaches the hub, so the seq read now (or
                # a later one the hub dispatches) is where the group stands for joiners.
                seq = await self.group_seq(group)
        except (TimeoutError, *_FAILURES):
            logger.debug("subscription to %s not confirmed yet; continuing", channel)
            return
        if group in self.hub.groups:
            self.hub.latest[group] = max(seq, self.hub.latest.get(group, 0))

    async def _unsubscribe(self, group: str) -> None:
        if self._pubsub is not None:
            with contextlib.suppress(*_FAILURES):
                await self._pubsub.unsubscribe(self._channel(group))

    def _subscribed_to(self, channel: bytes | str) -> None:
        """Redis confirmed a subscription: release whoever waits for it, and announce the group
        (or, for the control channel, start loading what the others subscribe to: from here
        no announcement is missed)."""
        name = channel.decode() if isinstance(channel, bytes) else channel
        for future in self._confirmations.pop(name, ()):
            if not future.done():
                future.set_result(None)
        if name == self._control_channel:
            self._stop_loading()
            self._loader = asyncio.create_task(self._load_subscribed_forever(), name="redis-fanout-groups")
            return
        self._unannounced.add(self._group_of(name))
        if self._announcer is None or self._announcer.done():
            self._announcer = asyncio.create_task(self._announce(), name="redis-fanout-announce")

    async def _announce(self) -> None:
        """Tell every server process which groups this one now subscribes to, a message for
        all the confirmations at hand (a reconnect's many at once). A failed announcement is
        only late: the others' next load finds the subscription."""
        while self._unannounced:
            groups, self._unannounced = sorted(self._unannounced), set()
            try:
                async with asyncio.timeout(self.command_timeout):
                    await self._client().redis.publish(
                        self._control_channel, json.dumps({"subscribed": groups})
                    )
            except _FAILURES as exc:
                logger.debug("announcing %d subscriptions failed: %s", len(groups), exc)

    def _heard_on_control(self, data: bytes) -> None:
        try:
            groups = json.loads(data)["subscribed"]
            if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            logger.warning("ignoring an unknown message on %s: %.100r", self._control_channel, data)
            return
        self.subscribed.announced(groups)

    async def _load_subscribed_forever(self) -> None:
        """Load which groups are followed anywhere, again every ``subscriptions_reload`` s."""
        while True:
            self.subscribed.loading()
            try:
                async with asyncio.timeout(self.command_timeout):
                    channels = await self._client().redis.pubsub_channels(
                        _starting_with(f"{self.prefix}:group:")
                    )
                self.subscribed.loaded(self._group_of(channel) for channel in channels)
            except _FAILURES as exc:
                logger.debug("loading the subscribed groups failed: %s", exc)
                self.subscribed.forget()  # until a load works: NUMSUB per question
            await asyncio.sleep(self.subscriptions_reload)

    def _stop_loading(self) -> None:
        if self._loader is not None:
            self._loader.cancel()
            self._loader = None
        self.subscribed.forget()

    async def _read_forever(self) -> None:
        connected_before = False
        outage_since: float | None = None
        backoff = 0.1
        while True:
            client = self._new_client()
            pubsub = client.pubsub()
            try:
                channels = [self._control_channel, *(self._channel(g) for g in self.hub.groups)]
                async with asyncio.timeout(self.command_timeout):
                    await pubsub.subscribe(*channels)
                self._pubsub = pubsub
                if outage_since is not None:
                    self.reconnects += 1
                    REDIS_RECONNECTS.inc()
                    logger.warning(
                        "redis subscription restored after %.1fs; resyncing %d groups",
                        time.monotonic() - outage_since,
                        len(self.hub.groups),
                    )
                if connected_before:
                    self.hub.latest.clear()  # the store may have restarted: ask it again
                    self.hub.lost(self.hub.groups)
                connected_before = True
                outage_since = None
                backoff = 0.1
                await self._read_messages(pubsub)
            except asyncio.CancelledError:
                raise
            except _FAILURES as exc:
                if outage_since is None:
                    outage_since = time.monotonic()
                    logger.warning("redis subscription lost (%s); reconnecting", exc or type(exc).__name__)
            finally:
                self._pubsub = None
                self._stop_loading()
                # A cancel that lands here (the layer closing) must end the reader, not be
                # taken for a failed close and followed by a reconnect.
                with contextlib.suppress(*_FAILURES):
                    await asyncio.wait_for(pubsub.aclose(), self.command_timeout)
                    await asyncio.wait_for(client.aclose(), self.command_timeout)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _read_messages(self, pubsub) -> None:
        """Dispatch until the connection fails; a missed ping reply counts as a failure."""
        last_heard = time.monotonic()
        ping_sent: float | None = None
        control_channel = self._control_channel.encode()
        while True:
            reply = await pubsub.get_message(timeout=min(1.0, self.ping_interval))
            now = time.monotonic()
            if reply is None:
                if ping_sent is not None and now - ping_sent > self.command_timeout:
                    raise TimeoutError("redis did not answer a ping")
                if ping_sent is None and now - last_heard > self.ping_interval:
                    await pubsub.ping()
                    ping_sent = now
                continue
            last_heard, ping_sent = now, None
            kind = reply["type"]
            if kind == "message":
                if reply["channel"] == control_channel:
                    self._heard_on_control(reply["data"])
                    continue
                seq, _, data = reply["data"].partition(b":")
                self.hub.dispatch(self._group_of(reply["channel"]), int(seq), self.decode(data))
            elif kind == "subscribe":
                self._subscribed_to(reply["channel"])
