"""Writing frames to one client's socket, with a bound on what may pile up for it.

ASGI gives an application no back-pressure: ``send`` never blocks, so a client that stops
reading makes the server buffer without limit. A transport bounds that buffer: ``send_text``
answers False once the client is too far behind, and the consumer then closes it (1013).

``DaphneTransport`` writes straight into daphne's websocket protocol, which is what daphne's own
``send`` does, minus a coroutine per message, and reads the real size of the socket's pending
output. ``QueuedTransport`` works on any ASGI server: a bounded queue drained by one writer task.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Protocol

logger = logging.getLogger(__name__)

AsgiSend = Callable[[dict], Awaitable[None]]


class Transport(Protocol):
    def send_text(self, text: str) -> bool:
        """Queue a text frame; False when the client is too far behind to take more."""

    def close(self, code: int) -> None:
        """Close after the frames already queued."""

    def buffered_bytes(self) -> int:
        """Output accepted but not yet written to the socket."""

    @property
    def closed(self) -> bool:
        """True once the connection is closed."""


class DaphneTransport:
    def __init__(self, protocol, server, max_buffer: int, socket_send_buffer: int = 0):
        self.protocol = protocol
        self.server = server
        self.max_buffer = max_buffer
        if socket_send_buffer:
            # Left alone, Linux grows a socket's send buffer up to megabytes for a client that
            # does not read, out of sight of max_buffer; a fixed size keeps the bound tight.
            sock = getattr(protocol.transport, "socket", None)
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, socket_send_buffer)

    @classmethod
    def wrap(cls, send: AsgiSend, max_buffer: int, socket_send_buffer: int = 0) -> DaphneTransport | None:
        """The transport behind daphne's ``send`` (``partial(server.handle_reply, protocol)``)."""
        if not isinstance(send, functools.partial) or len(send.args) != 1:
            return None
        server = getattr(send.func, "__self__", None)
        protocol = send.args[0]
        if not hasattr(server, "connections") or not hasattr(protocol, "sendMessage"):
            return None
        return cls(protocol, server, max_buffer, socket_send_buffer)

    def _open(self) -> bool:
        details = self.server.connections.get(self.protocol)
        return (
            details is not None
            and "disconnected" not in details
            and self.protocol.state == self.protocol.STATE_OPEN
        )

    @property
    def closed(self) -> bool:
        return self.protocol.state == self.protocol.STATE_CLOSED

    def buffered_bytes(self) -> int:
        tcp = self.protocol.transport
        try:
            return len(tcp.dataBuffer) - tcp.offset + tcp._tempDataLen
        except AttributeError:  # not a Twisted file-descriptor transport (e.g. TLS wrapper)
            return 0

    def send_text(self, text: str) -> bool:
        if not self._open():
            return True
        if self.buffered_bytes() > self.max_buffer:
            return False
        self.protocol.sendMessage(text.encode(), False)
        return True

    def close(self, code: int) -> None:
        if self._open():
            # sendClose (and so daphne's "websocket.close") only takes 1000 and 3000-4999;
            # the close frame itself may carry any code, 1001/1008/1013 included.
            self.protocol.sendCloseFrame(code=code, isReply=False)


class QueuedTransport:
    _CLOSE = object()

    def __init__(self, send: AsgiSend, max_messages: int):
        self._send = send
        self._queue: asyncio.Queue = asyncio.Queue(maxsize=max_messages)
        self._writer: asyncio.Task | None = None
        self._closed = False
        self._pending_bytes = 0

    def buffered_bytes(self) -> int:
        return self._pending_bytes

    @property
    def closed(self) -> bool:
        return self._closed and (self._writer is None or self._writer.done())

    def send_text(self, text: str) -> bool:
        if self._closed:
            return True
        try:
            self._queue.put_nowait(text)
        except asyncio.QueueFull:
            return False
        self._pending_bytes += len(text)
        self._ensure_writer()
        return True

    def close(self, code: int) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._queue.put_nowait((self._CLOSE, code))
            self._ensure_writer()
        except asyncio.QueueFull:
            # The client is not reading: drop what it would never get and close now.
            if self._writer is not None:
                self._writer.cancel()
            asyncio.ensure_future(self._send({"type": "websocket.close", "code": code}))

    def _ensure_writer(self) -> None:
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write())

    async def _write(self) -> None:
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, tuple) and item[0] is self._CLOSE:
                await self._send({"type": "websocket.close", "code": item[1]})
                return
            self._pending_bytes -= len(item)
            await self._send({"type": "websocket.send", "text": item})

    def stop(self) -> None:
        if self._writer is not None:
            self._writer.cancel()


_announced = False


def transport_for(
    send: AsgiSend, *, max_buffer_bytes: int, max_queued_messages: int, socket_send_buffer: int = 0
) -> Transport:
    global _announced
    transport = DaphneTransport.wrap(send, max_buffer_bytes, socket_send_buffer) or QueuedTransport(
        send, max_queued_messages
    )
    if not _announced:
        _announced = True
        logger.info("websocket frames are written by %s", type(transport).__name__)
    return transport
