"""ProcessDataBroadcastThread: the one place where process and engine changes become group messages.

Worker threads must not touch the channel layer (async Redis clients are bound to an event
loop and are not thread-safe), and broadcasting must never slow a step. So a worker only puts
a small update on this thread's queue (``put_nowait``: microseconds, never blocks), and this
thread, one per server process with an event loop of its own, reads the database, builds the
frames (``processes.messages``), encodes each once and sends them with ``group_send``, a batch
per round trip when the layer can.

The queue is bounded: when it is full (the layer is down or slow) the oldest update is dropped
and counted, and the groups it concerned are marked lost. The first send that works again
starts with a ``group.resync`` message to each lost group, so its clients reload instead of
silently missing a change. The same happens to the groups of a batch whose send failed.

The process list is coalesced: the first change of a process goes out at once, further changes
within ``list_coalesce_seconds`` go out as one message with the latest state at the window's end.
Detail and events messages are never coalesced.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import connection
from django.http import HttpRequest

from engine_status.selectors import EngineStatus, get_engine_status
from orchestrator_ws.realtime.layers import FanoutChannelLayer
from orchestrator_ws.realtime.metrics import (
    BROADCAST_DROPPED,
    BROADCAST_QUEUE_DEPTH,
    BROADCAST_SEND_FAILURES,
    ENQUEUE_TO_SEND_SECONDS,
    MESSAGES_BROADCAST,
    group_kind,
)
from orchestrator_ws.realtime.outage import OutageLog
from orchestrator_ws.realtime.protocol import encode
from processes import messages, selectors
from processes.engine import BroadcastFunc, no_broadcast
from processes.models import Process, ProcessStatus, ProcessStep

logger = logging.getLogger(__name__)

GroupMessages = list[tuple[str, dict[str, Any]]]


@dataclass(frozen=True)
class ProcessUpdate:
    process_id: uuid.UUID
    status: str | None = None
    step_id: uuid.UUID | None = None
    status_counts_changed: bool = False
    deleted: bool = False
    enqueued_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class EngineStatusUpdate:
    lock_changed: bool
    enqueued_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class _ProcessView:
    """A process as one batch sees it: read once, its detail encoded once."""

    process: Process
    detail_text: str | None  # None: nobody watches its detail, it was not built
    steps: dict[uuid.UUID, ProcessStep]


_STOP = object()
# How long resync markers for groups whose messages were lost wait for a batch to go out with.
LOST_GROUPS_RETRY_SECONDS = 0.5


def _drop_broken_connection() -> None:
    """Keep the thread's database connection from batch to batch, unless it broke.

    Django's ``close_old_connections`` would close it after every batch (CONN_MAX_AGE is 0
    under ASGI), and opening one cost the thread about a millisecond a batch on SQLite, a round
    trip or more to PostgreSQL. A connection that raised an error is tested, and closed if it no
    longer works; the next query opens a new one.
    """
    if connection.connection is not None and connection.errors_occurred:
        if connection.is_usable():
            connection.errors_occurred = False
        else:
            connection.close()


class ProcessDataBroadcastThread(threading.Thread):
    def __init__(
        self,
        channel_layer,
        *,
        max_queue: int = 10_000,
        list_coalesce_seconds: float = 0.1,
        batch_size: int = 500,
    ):
        super().__init__(name="process-data-broadcast", daemon=True)
        self.channel_layer = channel_layer
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.list_coalesce_seconds = list_coalesce_seconds
        self.batch_size = batch_size
        self.dropped = 0
        self.overflow = OutageLog(logger, "the broadcast queue")
        self.sending = OutageLog(logger, "broadcasting")
        # Groups whose messages were dropped or failed to send; guarded by _lock (workers drop).
        self._lock = threading.Lock()
        self._lost_groups: set[str] = set()
        # Process list coalescing: when each process's window ends, and whether it changed since.
        self._list_window_ends: dict[uuid.UUID, float] = {}
        self._list_changed: set[uuid.UUID] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- producer side (any thread) -------------------------------------------------------------

    def enqueue(self, update: ProcessUpdate | EngineStatusUpdate) -> None:
        """Never blocks: a full queue drops its oldest update."""
        while True:
            try:
                self.queue.put_nowait(update)
                return
            except queue.Full:
                try:
                    oldest = self.queue.get_nowait()
                except queue.Empty:
                    continue
                if oldest is _STOP:
                    self.queue.put_nowait(_STOP)
                    return
                self._drop(oldest)

    def broadcast_process(self, process_id: uuid.UUID, **details: Any) -> None:
        """The ``broadcast_func`` handed to the engine and services (see BroadcastFunc)."""
        self.enqueue(ProcessUpdate(process_id, **details))

    def broadcast_engine_status(self, *, lock_changed: bool) -> None:
        self.enqueue(EngineStatusUpdate(lock_changed))

    def stop(self, timeout: float = 5.0) -> bool:
        """Send what is queued (for at most ``timeout`` seconds), then end; True if it ended."""
        self.enqueue(_STOP)
        self.join(timeout)
        return not self.is_alive()

    def _drop(self, update: ProcessUpdate | EngineStatusUpdate) -> None:
        with self._lock:
            self.dropped += 1
            self._lost_groups.update(self._groups_of(update))
        BROADCAST_DROPPED.inc()
        self.overflow.failed("the queue is full; dropping the oldest updates, their groups will resync")

    def _mark_lost(self, groups) -> None:
        with self._lock:
            self._lost_groups.update(groups)

    def _take_lost_groups(self) -> list[str]:
        with self._lock:
            lost, self._lost_groups = self._lost_groups, set()
        return sorted(lost)

    @staticmethod
    def _groups_of(update: ProcessUpdate | EngineStatusUpdate) -> list[str]:
        if isinstance(update, EngineStatusUpdate):
            return [messages.ENGINE_STATUS_GROUP, messages.EVENTS_GROUP]
        return [
            messages.PROCESS_LIST_GROUP,
            messages.process_detail_group(update.process_id),
            messages.EVENTS_GROUP,
        ]

    # --- the thread -----------------------------------------------------------------------------

    def run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            while True:
                updates, stopping = self._next_batch()
                try:
                    if updates or self._list_changed or self._lost_groups:
                        self._send(loop, updates, self._build(updates))
                    if stopping:
                        self._send(loop, [], self._build([], flush_list=True))
                except Exception:
                    # This thread must outlive anything a batch throws at it.
                    logger.exception("a broadcast batch failed; its groups will resync")
                    for update in updates:
                        self._mark_lost(self._groups_of(update))
                if stopping:
                    break
        finally:
            try:
                loop.run_until_complete(self._close_layer())
            except Exception:
                logger.exception("closing the channel layer's connections failed")
            loop.close()
            connection.close()

    def _next_batch(self) -> tuple[list, bool]:
        """Wait for updates (or a coalescing window to end); take what is queued, up to a batch."""
        timeout = None
        if self._list_changed:
            timeout = max(
                0.0, min(self._list_window_ends[pid] for pid in self._list_changed) - time.monotonic()
            )
        if self._lost_groups:
            # Their resync markers go out with the next batch, or after a pause if none comes.
            timeout = min(
                timeout if timeout is not None else LOST_GROUPS_RETRY_SECONDS, LOST_GROUPS_RETRY_SECONDS
            )
        updates = []
        try:
            updates.append(self.queue.get(timeout=timeout))
            while len(updates) < self.batch_size:
                updates.append(self.queue.get_nowait())
        except queue.Empty:
            pass
        stopping = _STOP in updates
        return [u for u in updates if u is not _STOP], stopping

    def _build(self, updates: list, *, flush_list: bool = False) -> GroupMessages:
        """The group messages for a batch of updates, in order.

        Each process changed in the batch is read once (its row and its steps: two queries
        for the whole batch) and its detail encoded once; every update of it still gets its
        own detail message, carrying the step it announces.

        Most processes have no detail page open anywhere. For those the detail (all steps,
        the costliest read and encoding here) is not built: the group gets a ``group.resync``
        in its place, which still takes a seq, so a page that opens meanwhile or replays across
        it reloads the detail instead of missing the change.
        """
        _drop_broken_connection()
        out: GroupMessages = [(group, messages.RESYNC_MESSAGE) for group in self._take_lost_groups()]
        process_updates = [u for u in updates if isinstance(u, ProcessUpdate)]
        engine_updates = [u for u in updates if isinstance(u, EngineStatusUpdate)]
        changed = {u.process_id for u in process_updates if not u.deleted}
        watched = self._watched(changed)
        try:
            views = self._read(changed, watched)
        except Exception:
            logger.exception("reading the processes of a broadcast batch failed; their groups will resync")
            views = {}
            for update in process_updates:
                if not update.deleted:
                    self._mark_lost(self._groups_of(update))
        for update in process_updates:
            try:
                out.extend(self._process_messages(update, views.get(update.process_id)))
            except Exception:
                logger.exception("building the broadcast of process %s failed", update.process_id)
        if engine_updates:
            out.extend(self._engine_messages(any(u.lock_changed for u in engine_updates)))
        out.extend(self._due_list_messages(flush=flush_list))
        return out

    def _watched(self, process_ids: set[uuid.UUID]) -> set[uuid.UUID]:
        """The processes whose detail group has a subscriber on some server (all, if unknown)."""
        if not isinstance(self.channel_layer, FanoutChannelLayer) or not process_ids:
            return set(process_ids)
        groups = {messages.process_detail_group(pid): pid for pid in process_ids}
        try:
            found = self._loop.run_until_complete(self.channel_layer.watched(list(groups)))
            return {groups[group] for group in found}
        except Exception:
            return set(process_ids)  # the send will tell whether the layer is down

    @staticmethod
    def _read(process_ids: set[uuid.UUID], watched: set[uuid.UUID]) -> dict[uuid.UUID, _ProcessView]:
        views = {}
        for process, steps in selectors.processes_with_steps(process_ids & watched).values():
            views[process.pk] = _ProcessView(
                process=process,
                detail_text=encode(messages.process_detail(process, steps)),
                steps={step.step_id: step for step in steps},
            )
        for process in selectors.processes(process_ids - watched):
            views[process.pk] = _ProcessView(process=process, detail_text=None, steps={})
        return views

    def _process_messages(self, update: ProcessUpdate, view: _ProcessView | None) -> GroupMessages:
        pid = update.process_id
        detail_group = messages.process_detail_group(pid)
        events = [
            (messages.EVENTS_GROUP, messages.group_message(frame))
            for frame in messages.process_event_frames(
                pid, status_counts_changed=update.status_counts_changed
            )
        ]
        if update.deleted:
            self._list_window_ends.pop(pid, None)
            self._list_changed.discard(pid)
            gone = messages.deleted_process(pid)
            return [
                (messages.PROCESS_LIST_GROUP, messages.group_message(messages.process_list_frame(gone))),
                (detail_group, messages.group_message(messages.process_detail_frame(gone))),
                *events,
            ]
        if view is None:
            return []  # deleted meanwhile; the delete's own update announces it
        if view.detail_text is None:
            detail = messages.RESYNC_MESSAGE  # nobody watches it: see _build
        else:
            step = view.steps.get(update.step_id) if update.step_id else None
            detail = messages.process_detail_update(
                view.detail_text,
                messages.process_step(step) if step is not None else None,
                update.status or view.process.last_status,
            )
        out = [(detail_group, detail)]
        out.extend(self._list_message(view.process))
        if update.step_id is not None or update.status == ProcessStatus.RESUMED:
            out.extend(events)
        return out

    def _list_message(self, process) -> GroupMessages:
        pid = process.pk
        now = time.monotonic()
        if self.list_coalesce_seconds <= 0 or self._list_window_ends.get(pid, 0) <= now:
            self._list_window_ends[pid] = now + self.list_coalesce_seconds
            self._list_changed.discard(pid)
            summary = messages.process_summary(process)
            return [
                (messages.PROCESS_LIST_GROUP, messages.group_message(messages.process_list_frame(summary)))
            ]
        self._list_changed.add(pid)
        return []

    def _due_list_messages(self, *, flush: bool) -> GroupMessages:
        now = time.monotonic()
        due = [pid for pid in self._list_changed if flush or self._list_window_ends[pid] <= now]
        out: GroupMessages = []
        for pid in due:
            self._list_changed.discard(pid)
            process = selectors.get_process(pid)
            if process is not None:
                summary = messages.process_summary(process)
                out.append(
                    (
                        messages.PROCESS_LIST_GROUP,
                        messages.group_message(messages.process_list_frame(summary)),
                    )
                )
        for pid in [pid for pid, ends in self._list_window_ends.items() if ends <= now]:
            if pid not in self._list_changed:
                del self._list_window_ends[pid]
        return out

    def _engine_messages(self, lock_changed: bool) -> GroupMessages:
        status: EngineStatus = get_engine_status()
        out = [(messages.ENGINE_STATUS_GROUP, messages.group_message(messages.engine_status_frame(status)))]
        if lock_changed:
            out.append((messages.EVENTS_GROUP, messages.group_message(messages.engine_event_frame())))
        return out

    def _send(self, loop: asyncio.AbstractEventLoop, updates: list, group_messages: GroupMessages) -> None:
        if not group_messages:
            return
        try:
            loop.run_until_complete(self._group_send(group_messages))
        except Exception as exc:
            BROADCAST_SEND_FAILURES.inc()
            self._mark_lost(group for group, _ in group_messages)
            self.sending.failed(f"{exc or type(exc).__name__}; the groups concerned will resync")
            time.sleep(min(0.05 * self.sending.failures, 1.0))
            return
        self.sending.succeeded()
        if self.queue.empty():
            self.overflow.succeeded()
        sent_at = time.monotonic()
        for update in updates:
            ENQUEUE_TO_SEND_SECONDS.observe(sent_at - update.enqueued_at)
        for group, _ in group_messages:
            MESSAGES_BROADCAST.labels(group_kind(group)).inc()

    async def _close_layer(self) -> None:
        """Release what the layer holds on this thread's loop (inside it: stock layers look up
        their per-loop state on attribute access)."""
        close = getattr(self.channel_layer, "close", None)
        if close is not None:
            await close()

    async def _group_send(self, group_messages: GroupMessages) -> None:
        if isinstance(self.channel_layer, FanoutChannelLayer):
            await self.channel_layer.group_send_many(group_messages)
            return
        for group, message in group_messages:
            await self.channel_layer.group_send(group, message)


_thread: ProcessDataBroadcastThread | None = None


def start_broadcast_thread(channel_layer) -> ProcessDataBroadcastThread:
    """Start this server process's broadcast thread (at most one)."""
    global _thread
    if _thread is None or not _thread.is_alive():
        _thread = ProcessDataBroadcastThread(
            channel_layer,
            max_queue=settings.BROADCAST_QUEUE_SIZE,
            list_coalesce_seconds=settings.PROCESS_LIST_COALESCE_SECONDS,
        )
        _thread.start()
        BROADCAST_QUEUE_DEPTH.set_function(_thread.queue.qsize)
    return _thread


def stop_broadcast_thread(timeout: float = 5.0) -> None:
    global _thread
    thread, _thread = _thread, None
    if thread is not None and not thread.stop(timeout):
        logger.warning("the broadcast thread did not finish within %.1fs", timeout)


def running_broadcast_thread() -> ProcessDataBroadcastThread | None:
    return _thread


def api_broadcast_process_data(request: HttpRequest | None) -> BroadcastFunc:
    """The function a view hands to the services to announce process changes.

    It puts the change on this server process's broadcast queue; without a running broadcast
    thread (management commands) changes are not announced.
    """
    thread = _thread
    return thread.broadcast_process if thread is not None else no_broadcast


def broadcast_engine_status(sender, *, status: EngineStatus, lock_changed: bool, **kwargs) -> None:
    """Receiver of engine_status_changed: lock, unlock, a run starting or ending."""
    thread = _thread
    if thread is not None:
        thread.broadcast_engine_status(lock_changed=lock_changed)
