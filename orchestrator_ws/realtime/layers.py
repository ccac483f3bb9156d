"""Channel layers that fan group messages out once per server process, with sequence numbers.

The stock layers deliver a group message through every member's own channel: one serialized
copy, one queue and one task wake-up per member per message, and group memberships that expire
silently. Here the layer keeps a *hub* per server process: it holds one subscription per group
that has local members, stamps each message once with the group's sequence number and hands the
same stamped message to every local member, directly when the member attached a sink
(:meth:`FanoutChannelLayer.attach`), through its channel queue otherwise.

Every message on a group gets a ``seq`` that grows by exactly one per ``group_send``, and the
layer keeps a bounded history per group, so a member can tell when it missed something and
catch up (:meth:`group_history`). A message whose ``text`` is a JSON object gets the ``seq``
spliced in as its first key, so consumers forward that text to their socket unchanged: the
frame is encoded once by the sender and stamped once per server process.

The API is channels' (``new_channel``, ``send``, ``receive``, ``group_add``, ``group_discard``,
``group_send``, ``flush``), so any consumer works on it and a stock layer remains a
configuration switch. Point-to-point ``send`` reaches channels of this server process only.

:class:`InMemoryFanoutLayer` serves one server process; :class:`RedisFanoutLayer` (in
``redis_layer``) shares groups between all server processes through Redis.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from channels.exceptions import ChannelFull
from channels.layers import BaseChannelLayer

from orchestrator_ws.realtime.metrics import MESSAGES_FANNED_OUT, group_kind
from orchestrator_ws.realtime.transport import TextFrame

logger = logging.getLogger(__name__)

Message = dict[str, Any]


class GroupMember(Protocol):
    """A consumer that takes group messages straight from the hub instead of its queue."""

    def deliver(self, group: str, message: Message) -> None:
        """A stamped group message, in ``seq`` order; called on the hub's event loop."""

    def deliver_batch(self, group: str, batch: Batch) -> bool:
        """Take a run of messages at once if the member is in step with it; False: it gets
        them one by one through ``deliver`` instead."""

    def messages_may_be_lost(self, group: str) -> None:
        """The server's own stream of ``group`` was interrupted (e.g. Redis reconnected)."""

    def audit(self, group: str, seq: int) -> None:
        """Periodic check: the group's seq is ``seq``; a member still behind a previous audit's
        seq lost the latest messages (a loss no later message revealed) and catches up."""


def stamp(message: Message, seq: int) -> Message:
    """A copy of ``message`` carrying ``seq``, in the dict and inside a JSON-object ``text``."""
    stamped = dict(message)
    stamped["seq"] = seq
    text = message.get("text")
    if isinstance(text, str) and text.startswith("{"):
        rest = text[1:]
        stamped["text"] = f'{{"seq":{seq}' + ("," + rest if rest != "}" else "}")
    return stamped


class Batch:
    """A group's plain frames of one event-loop iteration, in unbroken ``seq`` order.

    Every member in step with the group (it has everything up to ``after``) takes the batch as
    one write of one joined buffer: the hub touches each member once per batch, not once per
    message, and the frames are joined once per server process, not once per socket.
    """

    __slots__ = ("after", "last", "messages", "_wire")

    def __init__(self, after: int):
        self.after = after
        self.last = after
        self.messages: list[Message] = []
        self._wire: bytes | None = None

    @staticmethod
    def takes(message: Message) -> bool:
        """Plain frames only: a resync or a closing frame goes through each member's checks."""
        return message["type"] == "group.frame" and not message.get("close")

    def add(self, message: Message) -> None:
        self.messages.append(message)
        self.last = message["seq"]
        self._wire = None

    @property
    def wire(self) -> bytes:
        if self._wire is None:
            self._wire = b"".join(TextFrame.of(message).wire for message in self.messages)
        return self._wire


class History:
    """What :meth:`FanoutChannelLayer.group_history` found after a given ``seq``."""

    def __init__(self, seq: int, messages: list[Message] | None):
        self.seq = seq
        # Stamped messages after the requested seq up to ``seq``, or None when the history no
        # longer covers that range (trimmed, expired, or lost with a Redis restart).
        self.messages = messages

    @property
    def complete(self) -> bool:
        return self.messages is not None


def contiguous(after: int, current: int, entries: Iterable[tuple[int, float, Message]], ttl: float):
    """The stamped messages after+1..current from ``entries``, or None if any is missing/expired."""
    if after > current:
        return None
    oldest_allowed = time.time() - ttl
    wanted = after + 1
    messages = []
    for seq, created, message in entries:
        if seq < wanted:
            continue
        if seq != wanted or created < oldest_allowed:
            return None
        messages.append(stamp(message, seq))
        wanted += 1
    return messages if wanted == current + 1 else None


class Hub:
    """This server process's local fan-out: which local channels are in which group.

    Plain frames are not handed out as they arrive: the frames a group gets within one event-loop
    iteration gather in a :class:`Batch`, delivered when the loop has run its current callbacks
    (as soon as a lone message allows, many at once when the loop is behind), and before
    anything else reaches the group's members (a membership change, a resync, a closing frame).
    """

    def __init__(self, queue_for: Callable[[str], asyncio.Queue]) -> None:
        self.groups: dict[str, dict[str, None]] = {}
        self.members: dict[str, GroupMember] = {}
        # The seq of each subscribed group's latest message here (dispatched or read at
        # subscription): a joining member starts after it without asking the store.
        self.latest: dict[str, int] = {}
        # Channels without a member get group messages through their queue (stock consumers).
        self.queue_for = queue_for
        self._batches: dict[str, Batch] = {}
        self._flush_scheduled = False

    def add(self, group: str, channel: str) -> bool:
        """Add a member; True when it is the group's first local member."""
        self.flush(group)
        channels = self.groups.setdefault(group, {})
        first = not channels
        channels[channel] = None
        return first

    def discard(self, group: str, channel: str) -> bool:
        """Remove a member; True when the group has no local member left."""
        channels = self.groups.get(group)
        if channels is None:
            return False
        self.flush(group)
        channels.pop(channel, None)
        if channels:
            return False
        del self.groups[group]
        self.latest.pop(group, None)
        return True

    def dispatch(self, group: str, seq: int, message: Message) -> None:
        """Stamp once, deliver to every local member (in the order dispatch is called)."""
        channels = self.groups.get(group)
        if not channels:
            return
        after = self.latest.get(group)
        self.latest[group] = seq
        stamped = stamp(message, seq)
        MESSAGES_FANNED_OUT.labels(group_kind(group)).inc(len(channels))
        batch = self._batches.get(group)
        if Batch.takes(stamped) and after == seq - 1 and (batch is None or batch.last == after):
            if batch is None:
                batch = self._batches[group] = Batch(after)
                self._schedule_flush()
            batch.add(stamped)
            return
        self.flush(group)
        for channel in list(channels):
            self._deliver(group, channel, self.members.get(channel), [stamped])

    def flush(self, group: str) -> None:
        """Deliver the group's pending batch now."""
        batch = self._batches.pop(group, None)
        channels = self.groups.get(group)
        if batch is None or not channels:
            return
        for channel in list(channels):
            member = self.members.get(channel)
            try:
                if member is not None and member.deliver_batch(group, batch):
                    continue
            except Exception:
                logger.exception("delivering a batch of group %s to %s failed", group, channel)
                continue
            self._deliver(group, channel, member, batch.messages)

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_all)

    def _flush_all(self) -> None:
        self._flush_scheduled = False
        for group in list(self._batches):
            self.flush(group)

    def _deliver(self, group: str, channel: str, member: GroupMember | None, messages: list[Message]) -> None:
        for message in messages:
            try:
                if member is not None:
                    member.deliver(group, message)
                else:
                    self.queue_for(channel).put_nowait(message)
            except asyncio.QueueFull:
                logger.warning("channel %s is full; dropped a message of group %s", channel, group)
            except Exception:
                logger.exception("delivering a message of group %s to %s failed", group, channel)

    def lost(self, groups: Iterable[str]) -> None:
        """Tell the members of ``groups`` that messages may have been lost."""
        for group in list(groups):
            self.flush(group)
            for member in self._members_of(group):
                member.messages_may_be_lost(group)

    def audit(self, group: str, seq: int) -> None:
        self.flush(group)
        for member in self._members_of(group):
            member.audit(group, seq)

    def _members_of(self, group: str) -> list[GroupMember]:
        return [m for m in (self.members.get(c) for c in list(self.groups.get(group, ()))) if m is not None]


class FanoutChannelLayer(BaseChannelLayer):
    """Shared machinery of the fan-out layers; subclasses store sequences and history."""

    extensions = ["groups", "flush"]

    def __init__(
        self,
        history_size: int = 1000,
        history_ttl: float = 600,
        audit_interval: float = 5.0,
        capacity: int = 100,
        **kwargs,
    ):
        super().__init__(capacity=capacity, **kwargs)
        self.history_size = history_size
        self.history_ttl = history_ttl
        self.audit_interval = audit_interval
        self._auditor: asyncio.Task | None = None
        self.queues: dict[str, asyncio.Queue] = {}
        self.hub = Hub(self._local_queue)
        self.client_prefix = secrets.token_hex(6)
        # The loop the consumers live on; group fan-out happens there.
        self.home_loop: asyncio.AbstractEventLoop | None = None

    # --- helpers for subclasses -----------------------------------------------------------------

    @staticmethod
    def encode(message: Message) -> str:
        return json.dumps(message, separators=(",", ":"))

    @staticmethod
    def decode(data: str | bytes) -> Message:
        return json.loads(data)

    def _bind_home_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self.home_loop is None or self.home_loop.is_closed():
            self.home_loop = loop
        elif self.home_loop is not loop:
            raise RuntimeError("group members of this layer must all live on one event loop")

    def _local_queue(self, channel: str) -> asyncio.Queue:
        queue = self.queues.get(channel)
        if queue is None:
            queue = self.queues[channel] = asyncio.Queue(maxsize=self.get_capacity(channel))
        return queue

    # --- channels API ---------------------------------------------------------------------------

    async def new_channel(self, prefix: str = "specific.") -> str:
        self._bind_home_loop()
        return f"{prefix}{self.client_prefix}!{secrets.token_hex(8)}"

    async def send(self, channel: str, message: Message) -> None:
        """Send to a channel of this server process (the only kind this layer routes)."""
        assert isinstance(message, dict), "message is not a dict"
        self.require_valid_channel_name(channel)
        if self.client_prefix not in channel:
            raise ValueError(f"{channel!r} is not a channel of this server process")
        try:
            self._local_queue(channel).put_nowait(message)
        except asyncio.QueueFull:
            raise ChannelFull(channel) from None

    async def receive(self, channel: str) -> Message:
        self.require_valid_channel_name(channel)
        return await self._local_queue(channel).get()

    async def group_add(self, group: str, channel: str) -> None:
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        self._bind_home_loop()
        if self._auditor is None or self._auditor.done():
            self._auditor = asyncio.create_task(self._audit_forever(), name="fanout-audit")
        if self.hub.add(group, channel):
            await self._subscribe(group)

    async def group_discard(self, group: str, channel: str) -> None:
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        if self.hub.discard(group, channel):
            await self._unsubscribe(group)

    async def group_send(self, group: str, message: Message) -> None:
        await self.group_send_many([(group, message)])

    async def group_send_many(self, messages: list[tuple[str, Message]]) -> list[int]:
        """Send several group messages in one go, in order; returns their sequence numbers."""
        for group, message in messages:
            assert isinstance(message, dict), "message is not a dict"
            self.require_valid_group_name(group)
        if not messages:
            return []
        return await self._publish(messages)

    async def flush(self) -> None:
        self.queues.clear()
        self.hub = Hub(self._local_queue)

    async def close(self) -> None:
        """Stop the audit (when called on the home loop); subclasses release their connections."""
        if self._auditor is not None and asyncio.get_running_loop() is self.home_loop:
            self._auditor.cancel()
            self._auditor = None

    async def _audit_forever(self) -> None:
        """Compare each group's seq with what its local members have, every audit_interval."""
        while True:
            await asyncio.sleep(self.audit_interval)
            for group in list(self.hub.groups):
                try:
                    seq = await self.group_seq(group)
                except Exception:
                    continue  # the layer is down; reconnecting will tell the members
                self.hub.audit(group, seq)

    # --- extensions -------------------------------------------------------------------------------

    def attach(self, channel: str, member: GroupMember) -> None:
        """Deliver this channel's group messages by calling ``member`` instead of queueing them."""
        self.hub.members[channel] = member

    def detach(self, channel: str) -> None:
        self.hub.members.pop(channel, None)
        self.queues.pop(channel, None)

    async def group_seq(self, group: str) -> int:
        """The sequence number of the group's latest message (0 before the first)."""
        return (await self.group_history(group, None)).seq

    async def watched(self, groups: list[str]) -> set[str]:
        """The groups among ``groups`` that have a member on some server process."""
        return {group for group in groups if self.hub.groups.get(group)}

    async def join_seq(self, group: str) -> int:
        """Where a member joining now starts: every message after it reaches the member.

        Call after ``group_add`` (and ``attach``): the hub knows the seq of the last message it
        dispatched for a subscribed group, so a join costs no round trip to the store.
        """
        known = self.hub.latest.get(group)
        return known if known is not None else await self.group_seq(group)

    async def group_history(self, group: str, after: int | None) -> History:
        """The group's current seq and, unless ``after`` is None, the messages after ``after``."""
        raise NotImplementedError

    # --- storage, per subclass ----------------------------------------------------------------

    async def _publish(self, messages: list[tuple[str, Message]]) -> list[int]:
        raise NotImplementedError

    async def _subscribe(self, group: str) -> None:
        """Start receiving the group's messages in this server process."""

    async def _unsubscribe(self, group: str) -> None:
        """Stop receiving the group's messages in this server process."""


class InMemoryFanoutLayer(FanoutChannelLayer):
    """The fan-out layer for a single server process (development, demos, tests).

    ``group_send`` may be called from any thread and event loop (the broadcast thread has its
    own): sequence numbers are taken under a lock and the fan-out is handed to the home loop
    with ``call_soon_threadsafe``, in sequence order.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._lock = threading.Lock()
        self._seqs: dict[str, int] = {}
        self._history: dict[str, list[tuple[int, float, Message]]] = {}

    async def _publish(self, messages: list[tuple[str, Message]]) -> list[int]:
        seqs = []
        with self._lock:
            for group, message in messages:
                seq = self._seqs.get(group, 0) + 1
                self._seqs[group] = seq
                history = self._history.setdefault(group, [])
                history.append((seq, time.time(), message))
                if len(history) > self.history_size:
                    del history[: len(history) - self.history_size]
                seqs.append(seq)
                loop = self.home_loop
                if loop is not None and not loop.is_closed():
                    loop.call_soon_threadsafe(self.hub.dispatch, group, seq, message)
        return seqs

    async def group_history(self, group: str, after: int | None) -> History:
        with self._lock:
            current = self._seqs.get(group, 0)
            entries = list(self._history.get(group, ()))
        if after is None:
            return History(current, [])
        return History(current, contiguous(after, current, entries, self.history_ttl))

    async def flush(self) -> None:
        await super().flush()
        with self._lock:
            self._seqs.clear()
            self._history.clear()
