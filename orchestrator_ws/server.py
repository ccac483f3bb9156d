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
from daphne.ws_protocol import WebSocketFactory
from prometheus_client import Histogram

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


class ClosingWebSocketFactory(WebSocketFactory):
    """daphne's websocket factory, failing a protocol violation with a close frame.

    autobahn's default for servers drops the TCP connection on a violation (an oversized
    frame, say), so the client only sees 1006; with ``failByDrop`` off it first sends the close
    frame with the reason's code (1009 for a frame over the limit).
    """

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
    daphne's application close timeout. The timeout walk runs every TIMEOUT_CHECK_SECONDS.
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
        for protocol in list(self.connections):
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


class CommandLine(CommandLineInterface):
    server_class = Server


def main(argv: list[str] | None = None) -> None:
    daphne.server.WebSocketFactory = ClosingWebSocketFactory
    tune_garbage_collector()
    args = argv if argv is not None else sys.argv[1:]
    CommandLine().run([*DAPHNE_DEFAULTS, *args, APPLICATION])


if __name__ == "__main__":
    main()
