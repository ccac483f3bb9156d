"""The launcher's short ways through daphne: small client frames and direct socket callbacks."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
import time

import pytest

from orchestrator_ws.server import DirectCallReactor, small_text_frame
from tests.helpers import MASK, client_frame
from tests.servers import DaphneServer


@pytest.mark.parametrize("payload", [b"__ping__", b"", b"x" * 125, "d\u00e9j\u00e0 \u2713".encode()])
def test_one_whole_small_text_frame_is_unmasked(payload):
    assert small_text_frame(client_frame(payload)) == payload


@pytest.mark.parametrize(
    "data",
    [
        client_frame(b"__pi", fin=False),  # the first fragment of a message
        client_frame(b"ng__", opcode=0x0),  # a continuation
        client_frame(b"\x00\x01", opcode=0x2),  # binary
        client_frame(b"are you there", opcode=0x9),  # a protocol ping
        client_frame(b"__ping__", masked=False),
        bytes((0xC1,)) + client_frame(b"__ping__")[1:],  # RSV1 without an extension
        client_frame(b"__ping__") * 2,  # two frames in one read
        client_frame(b"__ping__")[:-1],  # a frame cut short
        bytes((0x81, 0x80 | 126)) + struct.pack("!H", 126) + MASK + b"x" * 126,  # 16-bit length
        client_frame(b"\xff\xfe"),  # not UTF-8
    ],
    ids=["fragment", "continuation", "binary", "ping", "unmasked", "rsv1", "two", "cut", "long", "utf8"],
)
def test_anything_else_is_left_to_autobahn(data):
    assert small_text_frame(data) is None


class RawWebSocket:
    """A websocket client on a plain socket, to send frames exactly as a test writes them."""

    def __init__(self, server: DaphneServer, path: str = "/api/processes/all/"):
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                f"Origin: {server.http}\r\n\r\n"
            ).encode()
        )
        self.received = b""
        while b"\r\n\r\n" not in self.received:
            self.received += self._recv()
        head, self.received = self.received.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the socket")
        return data

    def _take(self, size: int) -> bytes:
        while len(self.received) < size:
            self.received += self._recv()
        taken, self.received = self.received[:size], self.received[size:]
        return taken

    def frame(self) -> tuple[int, bytes]:
        """The next server frame: (opcode, payload)."""
        first, second = self._take(2)
        size = second & 0x7F
        if size == 126:
            (size,) = struct.unpack("!H", self._take(2))
        elif size == 127:
            (size,) = struct.unpack("!Q", self._take(8))
        return first & 0x0F, self._take(size)

    def pongs(self, count: int) -> None:
        """Read until ``count`` __pong__ frames arrived (the snapshot comes first)."""
        while count:
            opcode, payload = self.frame()
            assert opcode == 0x1, (opcode, payload)
            count -= payload == b"__pong__"

    def close_code(self) -> int:
        while True:
            opcode, payload = self.frame()
            if opcode == 0x8:
                return struct.unpack("!H", payload[:2])[0]

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def server(database):
    server = DaphneServer(database.url).start()
    yield server
    assert server.stop() == 0, server.log
    assert "Traceback" not in server.log


@pytest.fixture
def client(server):
    client = RawWebSocket(server)
    yield client
    client.close()


def test_heartbeats_are_answered_however_their_frames_arrive(client):
    client.send(client_frame(b"__ping__"))
    client.pongs(1)
    client.send(client_frame(b"__pi", fin=False))  # a fragmented message: autobahn joins it
    client.send(client_frame(b"ng__", opcode=0x0))
    client.pongs(1)
    client.send(client_frame(b"__ping__") * 2)  # two frames in one segment
    client.pongs(2)
    whole = client_frame(b"__ping__")
    client.send(whole[:5])  # a frame split over two reads
    time.sleep(0.1)
    client.send(whole[5:])
    client.pongs(1)
    client.send(client_frame(b"hello"))  # ignored: clients only send heartbeats
    client.send(client_frame(b"__ping__"))
    client.pongs(1)


@pytest.mark.parametrize(
    "writes, code",
    [
        ([client_frame(b"\xff\xfe")], 1007),
        ([client_frame(b"__ping__", masked=False)], 1002),
        ([client_frame(b"__pi", fin=False), client_frame(b"__ping__")], 1002),  # new message mid-message
    ],
    ids=["not UTF-8", "unmasked", "interleaved"],
)
def test_bad_small_frames_close_the_connection_with_autobahn_codes(client, writes, code):
    for data in writes:
        client.send(data)
        time.sleep(0.1)  # each write is a read of its own
    assert client.close_code() == code


def test_the_reactor_calls_a_readers_handler_without_a_log_context():
    loop = asyncio.new_event_loop()
    reactor = DirectCallReactor(loop)
    ours, theirs = socket.socketpair()

    class Reader:
        def __init__(self):
            self.reads = []

        def fileno(self):
            return ours.fileno()

        def logPrefix(self):
            return "reader"

        def doRead(self):
            self.reads.append(ours.recv(100))
            loop.stop()

        def connectionLost(self, reason):
            pass

    reader = Reader()
    try:
        reactor.addReader(reader)
        handle = loop._selector.get_key(ours.fileno()).data[0]
        assert handle._callback == reactor._readOrWrite
        theirs.send(b"x")
        loop.run_forever()
        assert reader.reads == [b"x"]
        reactor.removeReader(reader)
    finally:
        ours.close()
        theirs.close()
        loop.close()
