"""DaphneTransport on a real connection: autobahn's and daphne's protocol over Twisted's TCP
transport and a kernel socket, with the event loop's part played by the test.

The transport writes batches and replies straight to the socket when nothing is held for it
elsewhere; under the launcher's protocol (TransportHooks) it keeps that verdict between
writes. These tests make autobahn and Twisted hold output (a message autobahn frames, a close,
the rest of a partial write) and check that nothing written later overtakes it: the client
reads the bytes in the order they were given. daphne's own protocol, which reports nothing,
must behave the same. The launcher's protocol also hands a client's small text frames to the
consumer directly.
"""

from __future__ import annotations

import asyncio
import base64
import os
import select
import socket
import time

import pytest
from daphne.ws_protocol import WebSocketFactory, WebSocketProtocol
from twisted.internet import tcp
from twisted.internet.testing import MemoryReactor
from twisted.python.failure import Failure

from orchestrator_ws.realtime.transport import DaphneTransport, TextFrame
from orchestrator_ws.server import HeartbeatFastProtocol
from tests.helpers import client_frame


class StubDaphneServer:
    """What daphne's websocket protocol asks of its server while a connection opens and closes."""

    root_path = ""
    proxy_forwarded_address_header = None
    _realPortNumber = 0  # for the repr of Twisted's transport

    def __init__(self):
        self.application_messages: list[dict] = []

    def protocol_connected(self, protocol):
        pass

    def protocol_disconnected(self, protocol):
        pass

    def log_action(self, *args):
        pass

    def create_application(self, protocol, scope):
        return self  # the application's queue

    def put_nowait(self, message: dict) -> None:
        self.application_messages.append(message)


class Connection:
    """An accepted websocket connection: ``server_side`` is Twisted's transport under the
    protocol, ``client`` the peer's plain socket. Twisted writes what it holds only when the
    test says the socket is writable (:meth:`writable`)."""

    def __init__(self, protocol_class, max_buffer: int = 1 << 20):
        with socket.create_server(("127.0.0.1", 0)) as listener:
            self.client = socket.create_connection(listener.getsockname())
            sock, address = listener.accept()
        sock.setblocking(False)
        daphne = StubDaphneServer()
        factory = WebSocketFactory(daphne, server="test")
        factory.protocol = protocol_class
        factory.setProtocolOptions(allowNullOrigin=True)
        self.protocol = factory.buildProtocol(address)
        self.protocol._raw_query_string = b""  # set by daphne's HTTP side, which upgrades the request
        self.server_side = tcp.Server(sock, self.protocol, address, daphne, 1, MemoryReactor())
        self.protocol.makeConnection(self.server_side)
        key = base64.b64encode(os.urandom(16)).decode()
        self.client.sendall(
            f"GET /ws/ HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        select.select([sock], [], [], 5)
        self.server_side.doRead()
        self.protocol.serverAccept()
        self.writable()
        response = self.received()
        assert response.startswith(b"HTTP/1.1 101") and response.endswith(b"\r\n\r\n"), response
        self.transport = DaphneTransport(self.protocol, max_buffer)

    def writable(self) -> None:
        """What the event loop does once the socket can take more: Twisted writes what it holds."""
        if self.server_side.dataBuffer or self.server_side._tempDataLen:
            self.server_side.doWrite()

    def received(self) -> bytes:
        """Everything the client can read now."""
        data = b""
        while select.select([self.client], [], [], 0.2)[0]:
            chunk = self.client.recv(1 << 20)
            if not chunk:
                break
            data += chunk
        return data

    def close(self) -> None:
        self.client.close()
        if hasattr(self.server_side, "socket"):
            self.server_side.socket.close()


@pytest.fixture(
    params=[HeartbeatFastProtocol, WebSocketProtocol], ids=["launcher's protocol", "daphne's protocol"]
)
def connection(request):
    connection = Connection(request.param)
    yield connection
    connection.close()


def wire(text: str) -> bytes:
    return TextFrame(text).wire


def test_batches_go_straight_to_an_idle_socket(connection):
    assert connection.transport.send_batch(wire("one") + wire("two"))
    assert connection.transport.send_batch(wire("three"))
    assert connection.received() == wire("one") + wire("two") + wire("three")


async def test_a_batch_does_not_overtake_what_autobahn_wrote(connection):
    transport = connection.transport
    assert transport.send_batch(wire("first"))
    connection.protocol.sendMessage(b"framed by autobahn", False)  # held by Twisted for now
    assert not transport.send_batch(wire("second"))
    assert transport.send_frame(TextFrame("second"))  # the consumer's way when a batch is refused
    await asyncio.sleep(0)  # the loop's end-of-iteration flush
    connection.writable()
    assert transport.send_batch(wire("third"))
    expected = wire("first") + wire("framed by autobahn") + wire("second") + wire("third")
    assert connection.received() == expected


def test_no_batch_follows_the_close_frame(connection):
    transport = connection.transport
    assert transport.send_batch(wire("before"))
    transport.close(1001)
    connection.writable()
    assert not transport.send_batch(wire("after"))
    connection.writable()
    assert connection.received() == wire("before") + b"\x88\x02" + (1001).to_bytes(2, "big")


async def test_the_rest_of_a_partial_write_holds_later_batches_back(connection):
    transport = connection.transport
    assert transport.send_batch(wire("small"))
    big = wire("x" * 4_000_000)  # more than the socket takes at once
    assert transport.send_batch(big)
    assert connection.server_side.dataBuffer or connection.server_side._tempDataLen
    assert not transport.send_batch(wire("later"))
    assert transport.send_frame(TextFrame("later"))
    await asyncio.sleep(0)
    received = b""
    for _ in range(1000):
        connection.writable()
        received += connection.received()
        if not (connection.server_side.dataBuffer or connection.server_side._tempDataLen):
            break
    assert transport.send_batch(wire("last"))
    received += connection.received()
    assert received == wire("small") + big + wire("later") + wire("last")


def test_a_lost_connection_takes_no_batch_and_leaves_no_cycle(connection):
    transport = connection.transport
    transport.receive_with(print)
    assert transport.send_batch(wire("before"))
    connection.client.close()
    select.select([connection.server_side.socket], [], [], 5)
    ended = connection.server_side.doRead()  # the end of the stream, which the reactor reports:
    connection.server_side.connectionLost(Failure(ended))
    assert not hasattr(connection.server_side, "socket")
    assert not transport.send_batch(wire("after"))
    assert transport.closed
    assert getattr(connection.protocol, "frame_writer", None) is None
    assert getattr(connection.protocol, "text_receiver", None) is None


async def test_a_reply_is_written_at_once_unless_frames_wait_for_the_socket(connection):
    transport = connection.transport
    assert transport.send_reply(TextFrame("pong"))
    assert connection.received() == wire("pong")  # no loop iteration ran
    connection.protocol.sendMessage(b"framed by autobahn", False)  # held by Twisted for now
    assert transport.send_reply(TextFrame("pong"))  # queued behind it, not ahead
    await asyncio.sleep(0)
    connection.writable()
    assert connection.received() == wire("framed by autobahn") + wire("pong")


def test_a_client_text_goes_straight_to_the_receiver_the_launchers_protocol_was_given(connection):
    received: list[dict] = []
    connection.transport.receive_with(received.append)
    connection.protocol.last_ping = 0.0
    connection.client.sendall(client_frame(b"__ping__"))
    select.select([connection.server_side.socket], [], [], 5)
    connection.server_side.doRead()
    assert connection.protocol.last_ping > time.time() - 5  # daphne's timeouts see the client alive
    queued = [m for m in connection.protocol.server.application_messages if m["type"] == "websocket.receive"]
    message = {"type": "websocket.receive", "text": "__ping__"}
    if isinstance(connection.protocol, HeartbeatFastProtocol):
        assert (received, queued) == ([message], [])
    else:  # daphne's protocol queues it for the consumer's task, as always
        assert (received, queued) == ([], [message])
