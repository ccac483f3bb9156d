"""Writing frames to one client's socket, with a bound on what may pile up for it.

ASGI gives an application no back-pressure: ``send`` never blocks, so a client that stops
reading makes the server buffer without limit. A transport bounds that buffer: ``send_text``
answers False once the client is too far behind, and the consumer then closes it (1013).

A group message goes to many sockets as the same bytes: :class:`TextFrame` encodes the text and
builds the websocket frame once, and every connection writes that one object.

``DaphneTransport`` writes those bytes straight to the socket under daphne's websocket protocol
(what daphne's ``send`` does through autobahn, minus a coroutine, a frame build and eager debug
formatting per message), and reads the real size of the socket's pending output.
``QueuedTransport`` works on any ASGI server: a bounded queue drained by one writer task.
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


class TextFrame:
    """A text message as every socket gets it: UTF-8 and websocket framing done once."""

    __slots__ = ("text", "_data", "_wire")

    def __init__(self, text: str):
        self.text = text
        self._data: bytes | None = None
        self._wire: bytes | None = None

    @classmethod
    def of(cls, message: dict) -> TextFrame:
        """The frame of a group message, made by the first connection that sends it."""
        frame = message.get("frame")
        if frame is None:
            frame = message["frame"] = cls(message["text"])
        return frame

    @property
    def data(self) -> bytes:
        if self._data is None:
            self._data = self.text.encode()
        return self._data

    @property
    def wire(self) -> bytes:
        """The whole server-to-client frame: FIN + text opcode, unmasked (RFC 6455, 5.2)."""
        if self._wire is None:
            data = self.data
            size = len(data)
            if size < 126:
                header = bytes((0x81, size))
            elif size < 1 << 16:
                header = bytes((0x81, 126)) + size.to_bytes(2, "big")
            else:
                header = bytes((0x81, 127)) + size.to_bytes(8, "big")
            self._wire = header + data
        return self._wire


class Transport(Protocol):
    def send_frame(self, frame: TextFrame) -> bool:
        """Queue a text frame; False when the client is too far behind to take more."""

    def send_text(self, text: str) -> bool:
        """``send_frame`` of a one-off text."""

    def send_batch(self, wire: bytes) -> bool:
        """Write whole frames now if nothing is queued ahead of them (no limit to check then);
        False: not written, they go through ``send_frame`` one by one."""

    def send_reply(self, frame: TextFrame) -> bool:
        """``send_frame`` for an answer to what the client just sent: written at once when
        nothing is queued for the socket. A lone reply has nothing to be gathered with, and
        waiting for the end of the loop iteration costs an iteration per heartbeat."""

    def receive_with(self, receiver: Callable[[dict], None]) -> None:
        """Where the server can, hand client messages (``websocket.receive``) to ``receiver`` as
        they arrive, on the event loop, instead of through the application's queue."""

    def close(self, code: int) -> None:
        """Close after the frames already queued."""

    def buffered_bytes(self) -> int:
        """Output accepted but not yet written to the socket."""

    @property
    def closed(self) -> bool:
        """True once the connection is closed."""


class DaphneTransport:
    """Frames for one socket under daphne, gathered per event-loop iteration.

    A frame is not written at once: the transport joins what it is given until the loop has run
    the current batch of callbacks, then writes it in one send (see :func:`_flush_pending`).
    A lone update still leaves within the same loop iteration; a burst of messages to the same
    clients becomes one segment per client rather than one per frame, which is what spares
    both ends a system call and a wake-up per message. Group messages mostly come already
    joined (``send_batch``: the hub's batch of the iteration, one buffer for all sockets).
    """

    __slots__ = ("protocol", "max_buffer", "_pending", "_pending_bytes", "_idle_socket_known")

    def __init__(self, protocol, max_buffer: int, socket_send_buffer: int = 0):
        self.protocol = protocol
        self.max_buffer = max_buffer
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        # The socket while raw writes to it are known to be safe (see _raw_socket), or None.
        self._idle_socket_known: socket.socket | None = None
        if isinstance(protocol, TransportHooks):
            protocol.frame_writer = self
        sock = getattr(protocol.transport, "socket", None)
        if sock is not None:
            # Each frame is one small write: send it now, not when the previous one is acked.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if socket_send_buffer:
                # Left alone, Linux grows a socket's send buffer up to megabytes for a client
                # that does not read, out of sight of max_buffer; a fixed size keeps it tight.
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
        return cls(protocol, max_buffer, socket_send_buffer)

    def _open(self) -> bool:
        return self.protocol.state == self.protocol.STATE_OPEN

    @property
    def closed(self) -> bool:
        return self.protocol.state == self.protocol.STATE_CLOSED

    def buffered_bytes(self) -> int:
        tcp = self.protocol.transport
        try:
            return self._pending_bytes + len(tcp.dataBuffer) - tcp.offset + tcp._tempDataLen
        except AttributeError:  # not a Twisted file-descriptor transport (e.g. TLS wrapper)
            return self._pending_bytes

    def send_frame(self, frame: TextFrame) -> bool:
        protocol = self.protocol
        if protocol.state != protocol.STATE_OPEN:
            return True
        if self.buffered_bytes() > self.max_buffer:
            return False
        if self._frames_go_raw():
            if not self._pending:
                _pending_transports.append(self)
                _schedule_flush()
            self._pending.append(frame.wire)
            self._pending_bytes += len(frame.wire)
        else:  # compression negotiated, or autobahn has frames of its own queued: let it frame
            self.flush()
            protocol.sendMessage(frame.data, False)
        return True

    def flush(self) -> None:
        """Write the gathered frames now (before anything else is written to this socket)."""
        if self._pending:
            data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
            self._pending, self._pending_bytes = [], 0
            self._write(data)

    def send_batch(self, wire: bytes) -> bool:
        sock = self._socket_to_write_now()
        if sock is None:
            return False
        self._send(sock, wire)
        return True

    def send_reply(self, frame: TextFrame) -> bool:
        sock = self._socket_to_write_now()
        if sock is None:
            return self.send_frame(frame)
        self._send(sock, frame.wire)
        return True

    def _socket_to_write_now(self) -> socket.socket | None:
        """The socket, when frames may be written to it at once: nothing gathered for it yet
        in this iteration, and raw writes safe (:meth:`_raw_socket`)."""
        if self._pending_bytes:
            return None
        sock = self._idle_socket_known
        return sock if sock is not None else self._raw_socket()

    def _raw_socket(self) -> socket.socket | None:
        """The socket, when prebuilt frames may be written to it now: the connection is open,
        frames go raw and Twisted holds nothing. Under a :class:`TransportHooks` protocol the
        answer is kept until the protocol or a write handed to Twisted voids it."""
        if not self._open() or not self._frames_go_raw():
            return None
        sock = self._idle_socket()
        if sock is not None and getattr(self.protocol, "frame_writer", None) is self:
            self._idle_socket_known = sock
        return sock

    def forget_idle_socket(self) -> None:
        """Raw writes may no longer be safe: check again before the next one."""
        self._idle_socket_known = None

    def _frames_go_raw(self) -> bool:
        """Prebuilt frames may be written as they are: no compression was negotiated and
        autobahn has no frames of its own queued (a close, a pong) to keep the order of."""
        protocol = self.protocol
        return protocol._perMessageCompress is None and not protocol.send_queue

    def _idle_socket(self) -> socket.socket | None:
        """The socket, when Twisted holds nothing for it, so a write now keeps the order."""
        tcp = self.protocol.transport
        sock = getattr(tcp, "socket", None)
        if (
            sock is not None
            and tcp.connected
            and not tcp.disconnecting
            and not getattr(tcp, "TLS", False)
            and not tcp.dataBuffer
            and not tcp._tempDataLen
        ):
            return sock
        return None

    def _write(self, data: bytes) -> None:
        """Send now when nothing is queued, else queue behind what is.

        Twisted's write always buffers and asks the event loop to watch the socket for
        writability, then stops watching once the buffer is flushed: two epoll_ctl calls and a
        loop iteration per frame, a third of a server's CPU in a fan-out. Like asyncio's own
        transports, try the socket first and hand Twisted only what it would not take.
        """
        sock = self._idle_socket()
        if sock is None:
            self._hand_to_twisted(data)
        else:
            self._send(sock, data)

    def _send(self, sock: socket.socket, data: bytes) -> None:
        try:
            sent = sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            sent = 0  # Twisted's write below meets the same error and closes properly
        if sent < len(data):
            self._hand_to_twisted(data[sent:])

    def _hand_to_twisted(self, data: bytes) -> None:
        """Queue behind what Twisted holds (it writes when the socket is writable)."""
        self._idle_socket_known = None
        self.protocol.transport.write(data)

    def send_text(self, text: str) -> bool:
        return self.send_frame(TextFrame(text))

    def receive_with(self, receiver: Callable[[dict], None]) -> None:
        if isinstance(self.protocol, TransportHooks) and self._open():
            self.protocol.text_receiver = receiver

    def close(self, code: int) -> None:
        if self._open():
            self.flush()
            # sendClose (and so daphne's "websocket.close") only takes 1000 and 3000-4999;
            # the close frame itself may carry any code, 1001/1008/1013 included.
            self.protocol.sendCloseFrame(code=code, isReply=False)


class TransportHooks:
    """A mixin for daphne's websocket protocol: what it does for the connection's DaphneTransport.

    It tells the transport when the socket may stop being safe for raw writes. ``send_batch``
    writes straight to the socket when the connection is open and neither autobahn nor Twisted
    holds output for it. Finding that out reads a dozen attributes of autobahn's protocol and
    Twisted's transport, objects a fan-out otherwise never touches: per socket and batch, that
    was an eighth of a server's CPU at an even message rate (docs/benchmarks.md). Here the
    transport checks once and keeps the answer until the protocol says it may have changed:
    when the connection's state changes (opening, closing, closed) and whenever autobahn writes
    (a pong, a ping, a close, a message it framed itself), which Twisted holds until the socket
    is next writable.

    And it may hand a client's message straight to the receiver the consumer gave the transport
    (``text_receiver``, set by :meth:`DaphneTransport.receive_with`) instead of queueing it for
    the consumer's task; the protocol decides which messages (the launcher's: whole small text
    frames).
    """

    frame_writer: DaphneTransport | None = None
    text_receiver: Callable[[dict], None] | None = None
    _state: int | None = None

    @property
    def state(self) -> int | None:
        return self._state

    @state.setter
    def state(self, value: int) -> None:
        self._state = value
        writer = self.frame_writer
        if writer is not None:
            writer.forget_idle_socket()
        if value == self.STATE_CLOSED:
            # Nothing more to tell or hand over; no cycle left behind.
            self.frame_writer = self.text_receiver = None

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        if self.frame_writer is not None:
            self.frame_writer.forget_idle_socket()
        super().sendData(data, sync, chopsize)


# Transports with frames gathered in this loop iteration, and whether their flush is scheduled.
_pending_transports: list[DaphneTransport] = []
_flush_scheduled = False


def _schedule_flush() -> None:
    global _flush_scheduled
    if not _flush_scheduled:
        _flush_scheduled = True
        asyncio.get_running_loop().call_soon(_flush_pending)


def _flush_pending() -> None:
    global _flush_scheduled
    _flush_scheduled = False
    transports = _pending_transports[:]
    _pending_transports.clear()
    for transport in transports:
        transport.flush()


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

    def send_frame(self, frame: TextFrame) -> bool:
        return self.send_text(frame.text)

    def send_batch(self, wire: bytes) -> bool:
        return False  # frames go through the queue, one by one

    def send_reply(self, frame: TextFrame) -> bool:
        return self.send_frame(frame)

    def receive_with(self, receiver: Callable[[dict], None]) -> None:
        pass  # messages come through the application's queue

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
