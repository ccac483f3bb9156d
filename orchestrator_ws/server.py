"""Run orchestrator-ws under daphne with the project's protocol limits.

    python -m orchestrator_ws.server -b 127.0.0.1 -p 8000

Any daphne option may be added; the defaults below come first so they can be overridden.
"""

from __future__ import annotations

import sys

import daphne.server
from daphne.cli import CommandLineInterface
from daphne.ws_protocol import WebSocketFactory

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


def main(argv: list[str] | None = None) -> None:
    daphne.server.WebSocketFactory = ClosingWebSocketFactory
    args = argv if argv is not None else sys.argv[1:]
    CommandLineInterface().run([*DAPHNE_DEFAULTS, *args, APPLICATION])


if __name__ == "__main__":
    main()
