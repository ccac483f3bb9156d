"""Run orchestrator-ws under daphne with the project's protocol limits and garbage collector settings.

    python -m orchestrator_ws.server -b 127.0.0.1 -p 8000

Any daphne option may be added; the defaults below come first so they can be overridden.
"""

from __future__ import annotations

import gc
import sys
import time

import daphne.server
from daphne.cli import CommandLineInterface
from daphne.ws_protocol import WebSocketFactory, WebSocketProtocol
from prometheus_client import Histogram
from twisted.internet.asyncioreactor import AsyncioSelectorReactor

from orchestrator_ws.realtime.transport import TransportHooks

APPLICATION = "orchestrator_ws.asgi:application"

# fmt: off
DAPHNE_DEFAULTS = [
    # Websocket sessions last as long as the client wants; clients reconnect on their own.
    "--websocket_timeout", "-1",
    # Drop a client whose handshake stalls, instead of holding its socket for daphne's 20 s.
    "--websocket_connect_timeout", "10",
    # Protocol-level pings to a connection silent for ping-interval seconds (clients that send
    # their __ping__ every 30 s never need one); a dead peer is dropped after ping-timeout.
    "--ping-interval", "60",
    "--ping-timeout", "30",
    # Clients send only heartbeats: autobahn refuses anything this big before it is buffered
    # (the consumers' own limit, WS_MAX_CLIENT_MESSAGE_BYTES, is smaller still).
    "--websocket-max-message-size", "65536",
    "--websocket-max-frame-size", "65536",
    # On shutdown, give consumers this long to close their sockets with 1001.
    "--application-close-timeout", "5",
]
# fmt: on


def small_text_frame(data: bytes) -> bytes | None:
    """The payload of ``data`` if it is exactly one whole client text frame under 126 bytes.

    That is: FIN set, no RSV bits, opcode text, masked (RFC 6455 5.2), 7-bit length matching
    the rest of ``data``, and valid UTF-8. Anything else (fragments, several frames, control
    frames, bad input) is None, for autobahn to handle.
    """
    size = len(data) - 6
    if not 0 <= size < 126 or data[0] != 0x81 or data[1] != 0x80 | size:
        return None
    mask = data[2:6] * (size // 4 + 1)
    masked = int.from_bytes(data[6:], "little") ^ int.from_bytes(mask[:size], "little")
    payload = masked.to_bytes(size, "little")
    try:
        payload.decode()
    except UnicodeDecodeError:
        return None  # autobahn closes the connection with 1007
    return payload


class HeartbeatFastProtocol(TransportHooks, WebSocketProtocol):
    """daphne's websocket protocol with a short way in for what clients send: small text frames.

    A client sends a ``__ping__`` every 30 s. autobahn takes each through its general frame
    machine (a masker object per frame, incremental UTF-8 validation, a callback per frame
    stage) after formatting a debug line with terminal colours for every read, debug logging
    off or not: at 10,000 idle connections that was a third of the server's CPU. A read that is
    one whole small text frame, arriving between messages on an open connection without
    compression, is unmasked here. The message daphne's ``onMessage`` would queue for the
    consumer's task goes to the consumer directly when it asked for that (``text_receiver``,
    :class:`TransportHooks`): no queue, no task wake-up through the middleware's coroutines, no
    extra loop iteration. The consumer sees the same message and applies its limits. Every
    other read goes through autobahn and daphne.
    """

    def dataReceived(self, data: bytes) -> None:
        payload = None
        if (
            self.state == self.STATE_OPEN
            and self.current_frame is None
            and not self.inside_message
            and not self.data
            and self._perMessageCompress is None
        ):
            payload = small_text_frame(data)
        if payload is None:
            self._dataReceived(data)  # autobahn's path, minus the debug line
            return
        if self.autoPingTimeoutCall and self.autoPingRestartOnAnyTraffic:
            self._cancelAutoPingTimeoutCall()  # any data frame proves the peer alive (autobahn)
        receiver = self.text_receiver
        if receiver is None or self.muted:
            self.onMessage(payload, False)
            return
        self.last_ping = time.time()  # what daphne's onMessage notes, for its timeouts
        receiver({"type": "websocket.receive", "text": payload.decode()})


class ClosingWebSocketFactory(WebSocketFactory):
    """daphne's websocket factory, failing a protocol violation with a close frame.

    autobahn's default for servers drops the TCP connection on a violation (an oversized
    frame, say), so the client only sees 1006; with ``failByDrop`` off it first sends the close
    frame with the reason's code (1009 for a frame over the limit).
    """

    protocol = HeartbeatFastProtocol

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.setProtocolOptions(failByDrop=False)


# How often every connection's timeouts are checked (daphne: every 2 s). The timeouts checked
# are the handshake's 10 s and the protocol ping after 60 s of silence: 5 s keeps both close
# enough while a pass over 10,000 connections runs 2.5 times less often.
TIMEOUT_CHECK_SECONDS = 5


class Server(daphne.server.Server):
    """daphne's server, with its periodic walks over all connections made cheaper.

    At 10,000 idle websockets those walks were most of the server's idle CPU (docs/benchmarks.md).
    Once a second daphne's ``application_checker`` walks every connection to find the few whose
    application finished or whose socket closed. Here a connection is noted when one of those two
    things happens to it (its application's future completes, its socket closes), and daphne's
    own checker runs over just the noted ones; a closed one stays noted until it is reaped, for
    daphne's application close timeout. The timeout walk runs every TIMEOUT_CHECK_SECONDS and
    calls daphne's check only for the connections that can have something to time out.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.to_check: set = set()

    def create_application(self, protocol, scope):
        queue = super().create_application(protocol, scope)
        if queue is not None:
            instance = self.connections[protocol]["application_instance"]
            instance.add_done_callback(lambda _: self.to_check.add(protocol))
        return queue

    def protocol_disconnected(self, protocol):
        super().protocol_disconnected(protocol)
        self.to_check.add(protocol)

    def application_checker(self):
        noted, self.to_check = self.to_check, set()
        everyone = self.connections
        self.connections = {protocol: everyone[protocol] for protocol in noted if protocol in everyone}
        try:
            super().application_checker()  # deletes what it reaps from self.connections
        finally:
            checked, self.connections = self.connections, everyone
        for protocol in noted.difference(checked):
            everyone.pop(protocol, None)
        self.to_check.update(protocol for protocol, details in checked.items() if "disconnected" in details)

    def timeout_checker(self):
        # An open websocket that heard from its client within the ping interval has nothing to
        # time out (unless sessions have a time limit): daphne's check is skipped for it.
        quiet_since = time.time() - self.ping_interval
        unlimited_sessions = self.websocket_timeout < 0
        for protocol in list(self.connections):
            if (
                unlimited_sessions
                and isinstance(protocol, WebSocketProtocol)
                and protocol.state == protocol.STATE_OPEN
                and protocol.last_ping > quiet_since
            ):
                continue
            protocol.check_timeouts()
        daphne.server.reactor.callLater(TIMEOUT_CHECK_SECONDS, self.timeout_checker)


# The cyclic garbage collector's thresholds (CPython's: 700, 10, 10). A server holding 10,000
# websockets tracks about 1.3 million objects, and a full collection walks them all: 700 ms during
# which the event loop stands still (GC_PAUSE_SECONDS shows them). A full collection comes once
# a quarter of the tracked objects has been promoted since the last one, and what gets promoted
# is mostly short-lived objects that happened to be alive when a young collection ran. Young
# collections 14 times rarer let more of those die first: 10,000 clients connected in 12.2-13.8 s
# instead of 14.5-16.8 s, with fewer full collections on the way (docs/benchmarks.md).
GC_THRESHOLDS = (10_000, 10, 10)

GC_PAUSE_SECONDS = Histogram(
    "orchestrator_ws_gc_pause_seconds",
    "Garbage collector passes by generation; every thread of the process, the event loop's "
    "included, waits for one to end",
    ["generation"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
_gc_pass_began = 0.0


def _time_gc_pass(phase: str, info: dict) -> None:
    global _gc_pass_began
    if phase == "start":
        _gc_pass_began = time.perf_counter()
    else:
        GC_PAUSE_SECONDS.labels(str(info["generation"])).observe(time.perf_counter() - _gc_pass_began)


def tune_garbage_collector() -> None:
    """Set GC_THRESHOLDS and time every collection into GC_PAUSE_SECONDS."""
    gc.set_threshold(*GC_THRESHOLDS)
    if _time_gc_pass not in gc.callbacks:
        gc.callbacks.append(_time_gc_pass)


class DirectCallReactor(AsyncioSelectorReactor):
    """Twisted's asyncio reactor, calling a socket's read or write handler directly.

    The stock reactor wraps every readiness callback in ``callWithLogger``, which builds a log
    context (a logPrefix string, a dict copied onto a context stack) for each read and write,
    so that legacy log lines emitted meanwhile carry the socket's prefix. Nothing here logs
    through Twisted's legacy logger, and at 10,000 connections with heartbeats that wrapping
    was a tenth of the idle CPU. The registration is made as Twisted's, then its callback is
    replaced (the same selector key: no extra system call).
    """

    def addReader(self, reader) -> None:
        super().addReader(reader)
        fd = self._readers.get(reader)
        if fd is not None:  # not a descriptor Twisted polls instead (epoll refuses some)
            self._asyncioEventloop.add_reader(fd, self._readOrWrite, reader, True)

    def addWriter(self, writer) -> None:
        super().addWriter(writer)
        fd = self._writers.get(writer)
        if fd is not None:
            self._asyncioEventloop.add_writer(fd, self._readOrWrite, writer, False)


def use_direct_call_reactor() -> None:
    """Make daphne's reactor a DirectCallReactor, before it has any socket.

    daphne builds and installs its reactor when ``daphne.server`` is imported (on the loop it
    gives its ASGI_THREADS executor); its class is swapped rather than a second reactor made.
    """
    reactor = daphne.server.reactor
    if type(reactor) is AsyncioSelectorReactor:
        reactor.__class__ = DirectCallReactor


class CommandLine(CommandLineInterface):
    server_class = Server


def main(argv: list[str] | None = None) -> None:
    daphne.server.WebSocketFactory = ClosingWebSocketFactory
    use_direct_call_reactor()
    tune_garbage_collector()
    args = argv if argv is not None else sys.argv[1:]
    CommandLine().run([*DAPHNE_DEFAULTS, *args, APPLICATION])


if __name__ == "__main__":
    main()
