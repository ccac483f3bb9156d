"""What a server process starts beside the ASGI app, and how it stops.

Start: the system checks (refusing to serve on an error), the broadcast thread, and a worker run
for every process a stopped server left paused.
Stop (daphne's SIGTERM/SIGINT): every client gets close 1001 at once, the workers stop at their
next step boundary (processes stay resumable), the broadcast thread sends what is queued, and
the channel layer drops its subscriptions.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time

from channels.layers import get_channel_layer
from django.core.checks import run_checks
from django.db import connection

from orchestrator_ws.realtime.consumers import close_all
from orchestrator_ws.realtime.protocol import CLOSE_GOING_AWAY
from processes.engine import shutdown_worker_pool
from processes.process_data_broadcast import (
    api_broadcast_process_data,
    start_broadcast_thread,
    stop_broadcast_thread,
)
from processes.services import resume_stalled_processes

logger = logging.getLogger(__name__)

# Seconds a stopping server waits for clients to answer its close frames.
CLOSE_HANDSHAKE_WAIT = 3.0
BROADCAST_DRAIN_WAIT = 5.0


def start() -> None:
    _refuse_to_start_on_failed_checks()
    start_broadcast_thread(get_channel_layer())
    try:
        resume_stalled_processes(api_broadcast_process_data(None))
    except Exception:
        logger.exception("resuming the processes a stopped server left behind failed")
    finally:
        connection.close()  # the importing thread serves no requests
    if "daphne.server" in sys.modules:
        from twisted.internet import reactor

        reactor.addSystemEventTrigger("before", "shutdown", _before_daphne_shutdown)


def _refuse_to_start_on_failed_checks() -> None:
    """Run Django's system checks (daphne does not), and stop on any error."""
    errors = [message for message in run_checks() if message.is_serious()]
    if errors:
        raise SystemExit("orchestrator-ws: refusing to start:\n" + "\n".join(str(e) for e in errors))


def _before_daphne_shutdown():
    """Runs before daphne cancels the consumers: queue the 1001 close frames right now."""
    from twisted.internet import defer

    closing = close_all(CLOSE_GOING_AWAY)
    logger.info("shutting down: closing %d websockets with 1001", len(closing))
    stopped = defer.Deferred.fromFuture(asyncio.ensure_future(stop(closing)))
    stopped.addErrback(lambda failure: logger.error("shutdown failed: %s", failure.getTraceback()))
    return stopped


async def stop(closing=()) -> None:
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + CLOSE_HANDSHAKE_WAIT
    while any(not consumer.closed for consumer in closing) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await loop.run_in_executor(None, shutdown_worker_pool)
    await loop.run_in_executor(None, stop_broadcast_thread, BROADCAST_DRAIN_WAIT)
    layer = get_channel_layer()
    if layer is not None and hasattr(layer, "close"):
        await layer.close()
