"""The base of every websocket endpoint: one consumer per connection following one group.

It owns what the endpoints share, so the page consumers only say which group they follow and
what a client sees first:

- the handshake: the token (``?token=`` or the ``base64.bearer.token`` subprotocol) and the
  subprotocol echo;
- the heartbeat: ``__ping__`` is answered with ``__pong__`` at once;
- group membership, joined after accept and left on disconnect;
- the snapshot on connect, and *sync*: joining the stream without a gap or a duplicate.

Sync works like Centrifugo's recovery. The consumer joins the group first and buffers what the
group delivers; then it either replays the group history after the client's ``since`` or, when
the history no longer covers it, reads the group's seq and sends a fresh snapshot carrying that
seq (marked ``resync`` when the client asked for a replay it cannot have); finally it forwards
the buffered messages newer than what it sent. Live, every message must carry the seq after the
last one forwarded; a jump means something was lost between the layer and here, and the
consumer syncs again from its last seq. So a client either sees every message in order or is
told to resync: never a silent gap.

With a stock channel layer (the benchmark baseline) group messages arrive through the normal
channels dispatch (``group_frame``) and carry no seq; sync then is just the snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import weakref
from typing import ClassVar
from urllib.parse import parse_qs

from channels.consumer import AsyncConsumer, get_handler_name
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from django.conf import settings

from orchestrator_ws.realtime.layers import Batch, FanoutChannelLayer, Message
from orchestrator_ws.realtime.limits import ClientMessageGuard, open_connections
from orchestrator_ws.realtime.metrics import (
    CONNECTIONS_REFUSED,
    GAPS_REPAIRED,
    OPEN_CONNECTIONS,
    RESYNCS,
    SLOW_CLIENTS_CLOSED,
    group_kind,
)
from orchestrator_ws.realtime.outage import OutageLog
from orchestrator_ws.realtime.protocol import (
    BEARER_SUBPROTOCOL,
    CLOSE_BAD_REQUEST,
    CLOSE_NORMAL,
    CLOSE_POLICY_VIOLATION,
    CLOSE_TRY_AGAIN_LATER,
    PING,
    PONG,
    UNAUTHORIZED,
    Frame,
    encode,
    error_frame,
    resync_frame,
)
from orchestrator_ws.realtime.transport import TextFrame, Transport, transport_for

# Every heartbeat's answer is the same bytes: framed once, like a group message.
PONG_FRAME = TextFrame(PONG)

logger = logging.getLogger(__name__)

# Every open connection of this server process, for closing them all on shutdown.
open_consumers: weakref.WeakSet[GroupConsumer] = weakref.WeakSet()
# Syncing clients (reading seqs, history, snapshots) while the layer or database is down.
sync_outage = OutageLog(logger, "syncing websocket clients")


class ConnectRefused(Exception):
    """Raised by ``snapshot`` to refuse the client: ``frame`` is sent, then close with ``code``."""

    def __init__(self, frame: Frame, code: int):
        super().__init__(frame)
        self.frame = frame
        self.code = code


class HandshakeRejected(Exception):
    """The upgrade request itself is malformed; the handshake is refused (HTTP 403)."""


class GroupConsumer(AsyncWebsocketConsumer):
    # Where the client's token travels: "query" (?token=) or "subprotocol" (bearer subprotocol).
    token_in: ClassVar[str] = "query"

    group: str = ""
    transport: Transport | None = None
    last_seq: int | None = None
    # Whether this client got its first snapshot or replay: a later sync is a re-sync.
    synced = False
    _buffer: list[Message] | None = None
    _buffer_overflowed = False
    _sync_again = False
    _sync_again_resync = False
    _sync_task: asyncio.Task | None = None
    _closing = False
    _connection_keys: list = []
    _audit_mark: int | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._guard = ClientMessageGuard()

    # --- what page consumers define -------------------------------------------------------------

    def group_name(self) -> str:
        raise NotImplementedError

    async def snapshot(self) -> Frame | None:
        """The frame a new (or resyncing) client gets first; None when it gets nothing.

        A snapshot with ``"close": true`` is the whole stream: the connection closes after it.
        """
        return None

    # --- connection life ------------------------------------------------------------------------

    async def __call__(self, scope, receive, send) -> None:
        """channels' consumer loop, without a channel to listen on when the layer hands group
        messages straight to the consumer (``attach``).

        channels waits on the client and on the consumer's channel with two tasks and an
        ``asyncio.wait`` per message; here only the client speaks, so the loop just awaits it:
        two tasks less per connection, which is memory that counts at ten thousand.
        """
        layer = get_channel_layer(self.channel_layer_alias)
        if not isinstance(layer, FanoutChannelLayer):
            return await super().__call__(scope, receive, send)
        self.scope = scope
        self.channel_layer = layer
        self.channel_name = await layer.new_channel()
        self.base_send = send
        with contextlib.suppress(StopConsumer):
            while True:
                await self.dispatch(await receive())

    async def dispatch(self, message: Message) -> None:
        """channels' dispatch, without its close_old_connections before every handler.

        That call is a hop to a worker thread, per message: for ten thousand connections
        sending heartbeats it is most of an idle server's CPU. Nothing here touches the
        database outside ``snapshot``, whose database_sync_to_async does it anyway.
        """
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"no handler for message type {message['type']}")
        await handler(message)

    async def websocket_connect(self, message: Message) -> None:
        try:
            subprotocol, token = self._credentials()
        except HandshakeRejected as rejected:
            self._log_refusal("malformed handshake", str(rejected))
            await self.close()
            return
        client = self.scope.get("client") or [None]
        self._connection_keys = open_connections.keys(client[0], token)
        exceeded = open_connections.acquire(self._connection_keys)
        if exceeded is not None:
            self._connection_keys = []
            self._log_refusal(f"too many connections per {exceeded}")
            await self.close()
            return
        refusal = None
        since = join_seq = None
        if not self._authorized(token):
            self._log_refusal("unauthorized", code=CLOSE_POLICY_VIOLATION)
            refusal = (UNAUTHORIZED, CLOSE_POLICY_VIOLATION)
        else:
            try:
                since = self._since()
            except ValueError as exc:
                self._log_refusal("bad since", code=CLOSE_BAD_REQUEST)
                refusal = (error_frame(400, str(exc), title="Bad Request"), CLOSE_BAD_REQUEST)
        if refusal is None:
            # Join before completing the handshake: once a client is connected, nothing
            # published after that moment can pass it by. Deliveries wait in the buffer
            # until the sync below decides where the client's stream starts.
            self._buffer = []
            self.group = self.group_name()
            await self.channel_layer.group_add(self.group, self.channel_name)
            if self._sequenced:
                self.channel_layer.attach(self.channel_name, self)
                join_seq = await self._join_seq() if since is None else None
        await self.accept(subprotocol)
        self.transport = transport_for(
            self.base_send,
            max_buffer_bytes=settings.WS_MAX_BUFFER_BYTES,
            max_queued_messages=settings.WS_MAX_QUEUED_MESSAGES,
            socket_send_buffer=settings.WS_SOCKET_SEND_BUFFER_BYTES,
        )
        open_consumers.add(self)
        if refusal is not None:
            self._refuse(*refusal)
            return
        OPEN_CONNECTIONS.labels(group_kind(self.group)).inc()
        self.transport.receive_with(self.client_message)
        logger.info("websocket connected: %s from %s", self.group, client[0])
        self._start_sync(since, start_seq=join_seq, pending=self._take_buffer())

    async def websocket_receive(self, message: Message) -> None:
        self.client_message(message)

    def client_message(self, message: Message) -> None:
        """What the client sent: through ``websocket_receive``, or straight from the server's
        protocol (``Transport.receive_with``). Clients only ever send heartbeats; anything
        else is ignored, never broadcast."""
        if self.transport is None or self._closing:
            return
        offence = self._guard.check(message)
        if offence is not None:
            self._log_refusal("client message not allowed", code=offence)
            self.finish(offence)
        elif message.get("text") == PING:
            self.transport.send_reply(PONG_FRAME)

    async def websocket_disconnect(self, message: Message) -> None:
        self._closing = True
        if self._sync_task is not None:
            self._sync_task.cancel()
        if self.group:
            OPEN_CONNECTIONS.labels(group_kind(self.group)).dec()
            logger.info("websocket closed: %s, code %s", self.group, message.get("code"))
            if self._sequenced:
                self.channel_layer.detach(self.channel_name)
            await self.channel_layer.group_discard(self.group, self.channel_name)
        open_connections.release(self._connection_keys)
        self._connection_keys = []
        open_consumers.discard(self)
        raise StopConsumer

    async def _join_seq(self) -> int | None:
        """The group's seq as the client joins: it gets everything after, even what is sent
        while its handshake completes. None if the layer cannot tell now (the sync retries)."""
        try:
            return await self.channel_layer.join_seq(self.group)
        except Exception as exc:
            sync_outage.failed(exc)
            return None

    def _log_refusal(self, reason: str, detail: str = "", code: int | None = None) -> None:
        """One line per refused or closed client: path (never the query, tokens live there)."""
        CONNECTIONS_REFUSED.labels(reason).inc()
        logger.info(
            "websocket %s on %s%s%s",
            reason,
            self.scope["path"],
            f", code {code}" if code is not None else "",
            f": {detail}" if detail else "",
        )

    @property
    def closed(self) -> bool:
        """True once the socket is gone (as far as the transport can tell)."""
        return self.transport is None or self.transport.closed

    def finish(self, code: int) -> None:
        """Close the connection after what is already queued for it."""
        if not self._closing and self.transport is not None:
            self._closing = True
            self.transport.close(code)

    def _refuse(self, frame: Frame, code: int) -> None:
        self.transport.send_text(encode(frame))
        self.finish(code)

    # --- handshake ------------------------------------------------------------------------------

    @property
    def _sequenced(self) -> bool:
        return isinstance(self.channel_layer, FanoutChannelLayer)

    def _query(self) -> dict[str, list[str]]:
        return parse_qs(self.scope.get("query_string", b"").decode("latin-1"))

    def _credentials(self) -> tuple[str | None, str | None]:
        """(subprotocol to echo, token offered) from the upgrade request."""
        if self.token_in == "subprotocol":
            offered = self.scope.get("subprotocols") or []
            if not offered:
                return None, None
            if len(offered) != 2 or offered[0] != BEARER_SUBPROTOCOL or not offered[1]:
                raise HandshakeRejected(f"expected '{BEARER_SUBPROTOCOL}, <token>' as subprotocols")
            return BEARER_SUBPROTOCOL, offered[1]
        tokens = self._query().get("token")
        return None, tokens[-1] if tokens else None

    def _authorized(self, token: str | None) -> bool:
        if not settings.WS_AUTH_REQUIRED:
            return True
        user = self.scope.get("user")
        if user is not None and user.is_authenticated:
            return True
        if not token:
            return False
        return any(hmac.compare_digest(token.encode(), known.encode()) for known in settings.WS_AUTH_TOKENS)

    def _since(self) -> int | None:
        values = self._query().get("since")
        if not values:
            return None
        value = values[-1]
        if not value.isdigit():
            raise ValueError("since must be a non-negative integer (the last seq the client has)")
        return int(value)

    # --- delivery -------------------------------------------------------------------------------

    def deliver(self, group: str, message: Message) -> None:
        """Called by the layer's hub for each group message (the GroupMember protocol)."""
        if self._closing:
            return
        if self._buffer is None:
            self._forward(message)
        elif len(self._buffer) < settings.WS_SYNC_BUFFER_MESSAGES:
            self._buffer.append(message)
        else:
            self._buffer_overflowed = True

    def deliver_batch(self, group: str, batch: Batch) -> bool:
        """A run of plain frames (the GroupMember protocol): one write when this client has
        everything before it and nothing else is queued for its socket."""
        if self._closing or self._buffer is not None or self.last_seq != batch.after:
            return False
        if not self.transport.send_batch(batch.wire):
            return False
        self.last_seq = batch.last
        return True

    def messages_may_be_lost(self, group: str) -> None:
        """The server's stream was interrupted: catch up from the history (or resync)."""
        if not self._closing:
            self._start_sync(self.last_seq)

    def audit(self, group: str, seq: int) -> None:
        """Still behind the seq of the previous audit: the latest messages were lost."""
        mark, self._audit_mark = self._audit_mark, seq
        idle = self._buffer is None and not self._closing
        if idle and None not in (mark, self.last_seq) and self.last_seq < mark:
            GAPS_REPAIRED.labels(group_kind(self.group)).inc()
            logger.warning("%s: stuck at seq %d, the group is at %d; catching up", group, self.last_seq, seq)
            self._start_sync(self.last_seq)

    async def group_frame(self, message: Message) -> None:
        """A group message through channels' dispatch (stock layers)."""
        self.deliver(message.get("group", self.group), message)

    async def group_resync(self, message: Message) -> None:
        self.deliver(message.get("group", self.group), message)

    def _forward(self, message: Message) -> None:
        seq = message.get("seq")
        if seq is not None and self.last_seq is not None:
            if seq <= self.last_seq:
                return  # already sent (replayed, or covered by the snapshot)
            if seq != self.last_seq + 1:
                GAPS_REPAIRED.labels(group_kind(self.group)).inc()
                logger.warning(
                    "gap on %s: expected seq %d, got %d; catching up", self.group, self.last_seq + 1, seq
                )
                self._start_sync(self.last_seq, pending=[message])
                return
        if seq is not None:
            self.last_seq = seq
        if message["type"] == "group.resync":
            # The sender lost messages of this group: start over from a fresh snapshot.
            self._start_sync(None, resync=True)
            return
        if not self.transport.send_frame(TextFrame.of(message)):
            self._too_slow()
            return
        if message.get("close"):
            self.finish(CLOSE_NORMAL)

    def _too_slow(self) -> None:
        SLOW_CLIENTS_CLOSED.inc()
        logger.warning(
            "closing a websocket on %s: client is %d bytes behind",
            self.group,
            self.transport.buffered_bytes(),
        )
        self.finish(CLOSE_TRY_AGAIN_LATER)

    # --- sync -----------------------------------------------------------------------------------

    def _take_buffer(self) -> list[Message]:
        buffered, self._buffer = self._buffer or [], None
        return buffered

    def _start_sync(
        self,
        since: int | None,
        *,
        resync: bool = False,
        start_seq: int | None = None,
        pending: list[Message] = (),
    ) -> None:
        """Catch up after ``since``, or snapshot at ``start_seq`` (None: the group's seq now)."""
        if self._buffer is not None:
            # A sync is under way; it may have read the history before this reason to sync
            # arose, so it runs once more (from its own last seq) when it is done.
            self._buffer.extend(pending)
            self._sync_again = True
            self._sync_again_resync = self._sync_again_resync or resync
            return
        self._buffer = list(pending)
        self._sync_again = self._sync_again_resync = False
        self._sync_task = asyncio.ensure_future(self._run_sync(since, resync, start_seq))

    async def _run_sync(self, since: int | None, resync: bool, start_seq: int | None) -> None:
        delay = 0.1
        while not self._closing:
            try:
                await self._catch_up(since, resync, start_seq)
                sync_outage.succeeded()
                break
            except ConnectRefused as refused:
                self._buffer = None
                self._refuse(refused.frame, refused.code)
                return
            except Exception as exc:
                sync_outage.failed(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        buffered = self._take_buffer()
        if self._sync_again or self._buffer_overflowed:
            self._buffer_overflowed = False
            self._start_sync(self.last_seq, resync=self._sync_again_resync, pending=buffered)
            return
        for message in buffered:
            self.deliver(self.group, message)

    async def _catch_up(self, since: int | None, resync: bool, start_seq: int | None) -> None:
        """Replay after ``since`` when the history has it all, else send a snapshot.

        A new client's snapshot is stamped with the seq read when it joined (``start_seq``):
        whatever was sent after that is in the buffer and follows the snapshot. The snapshot
        itself is read later, so it may already show some of it; detail and engine frames
        describe whole states, so showing a change twice is harmless and none is missed.
        """
        layer = self.channel_layer
        if since is not None and self._sequenced:
            history = await layer.group_history(self.group, since)
            replayable = history.complete and all(m["type"] == "group.frame" for m in history.messages)
            if replayable:
                self.last_seq = since
                for message in history.messages:
                    self._forward(message)
                self.last_seq = history.seq
                self.synced = True
                return
            resync = True
        seq = start_seq
        if seq is None and self._sequenced:
            seq = await layer.group_seq(self.group)
        frame = await self.snapshot()
        if frame is None:
            frame = resync_frame(seq) if resync else None
        else:
            frame = {**frame, "seq": seq} if seq is not None else dict(frame)
            if resync:
                frame["resync"] = True
        if resync:
            RESYNCS.labels(group_kind(self.group)).inc()
        self.last_seq = seq
        self.synced = True
        if frame is not None:
            self.transport.send_text(encode(frame))
            if frame.get("close"):
                self.finish(CLOSE_NORMAL)


class RejectHandshake(AsyncConsumer):
    """Refuses the upgrade of any websocket path no endpoint serves (HTTP 403)."""

    async def websocket_connect(self, message: Message) -> None:
        CONNECTIONS_REFUSED.labels("no such endpoint").inc()
        logger.info("websocket refused: no endpoint at %s", self.scope["path"])
        await self.send({"type": "websocket.close"})

    async def websocket_disconnect(self, message: Message) -> None:
        raise StopConsumer


def close_all(code: int) -> list[GroupConsumer]:
    """Close every open connection of this server process with ``code``; returns them."""
    consumers = list(open_consumers)
    for consumer in consumers:
        consumer.finish(code)
    return consumers
