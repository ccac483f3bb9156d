"""A load-generating client process: many websocket connections, counting what arrives.

Run by ``python -m bench`` (several at once, so the generator is not the bottleneck); driven
through stdin, one command per line, answering on stdout:

    READY                 printed once every connection is open
    RESET                 forget what arrived so far
    COUNT                 print how many frames arrived (cheap: polled while frames arrive)
    REPORT                print one JSON line of statistics
    QUIT                  close everything and exit

Each frame costs a few bytes' look: the ``seq`` is read from the frame's prefix (the project's
frames start with ``{"seq":``), and one frame in ``--sample`` is parsed for its
``last_modified_at`` to measure latency against the wall clock (same machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import datetime

import uvloop
from picows import WSListener, WSMsgType, WSTransport, ws_connect

SEQ_PREFIX = b'{"seq":'
STAMP_KEY = b'"last_modified_at":"'


class Stats:
    def __init__(self, sample_every: int):
        self.sample_every = sample_every
        self.reset()

    def reset(self) -> None:
        self.received = 0
        self.gaps = 0
        self.missing = 0
        self.latencies: list[float] = []
        self.first_at: float | None = None
        self.last_at: float | None = None


class Connection(WSListener):
    def __init__(self, stats: Stats):
        self.stats = stats
        self.last_seq: int | None = None
        self.close_code: int | None = None
        self.transport: WSTransport | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            stats = self.stats
            payload = frame.get_payload_as_bytes()
            now = time.time()
            stats.received += 1
            stats.last_at = now
            if stats.first_at is None:
                stats.first_at = now
            if payload.startswith(SEQ_PREFIX):
                seq = int(payload[7 : payload.index(b",", 7)])
                if self.last_seq is not None and seq != self.last_seq + 1 and b'"resync"' not in payload:
                    stats.gaps += 1
                    stats.missing += max(0, seq - self.last_seq - 1)
                self.last_seq = seq
            if stats.received % stats.sample_every == 0:
                at = payload.find(STAMP_KEY)
                if at >= 0:
                    start = at + len(STAMP_KEY)
                    stamp = payload[start : payload.index(b'"', start)].decode()
                    stats.latencies.append(now - datetime.fromisoformat(stamp).timestamp())
        elif frame.msg_type == WSMsgType.CLOSE:
            self.close_code = frame.get_close_code()


async def open_connections(urls: list[str], count: int, origin: str, stats: Stats) -> list[Connection]:
    """``count`` connections spread over ``urls``, at most 50 handshakes in flight."""
    gate = asyncio.Semaphore(50)

    async def one(index: int) -> Connection:
        async with gate:
            _, listener = await ws_connect(
                lambda: Connection(stats),
                urls[index % len(urls)],
                extra_headers={"Origin": origin},
                # Thousands connecting at once queue in the server's listen backlog.
                websocket_handshake_timeout=60,
            )
            return listener

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def heartbeat(connections: list[Connection], interval: float) -> None:
    """Each connection pings every ``interval`` seconds, the pings spread evenly over it."""
    pause = interval / max(1, len(connections))
    while True:
        for connection in connections:
            if connection.transport is not None and connection.close_code is None:
                connection.transport.send(WSMsgType.TEXT, b"__ping__")
            await asyncio.sleep(pause)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", action="append", required=True)
    parser.add_argument("--connections", type=int, required=True)
    parser.add_argument("--origin", default="http://127.0.0.1")
    parser.add_argument("--sample", type=int, default=20, help="parse one frame in N for latency")
    parser.add_argument("--heartbeat", type=float, default=0, help="send __ping__ every N s")
    args = parser.parse_args()

    stats = Stats(args.sample)
    connections = await open_connections(args.url, args.connections, args.origin, stats)
    if args.heartbeat:
        asyncio.ensure_future(heartbeat(connections, args.heartbeat))
    print("READY", flush=True)
    loop = asyncio.get_running_loop()
    while True:
        command = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
        if command == "RESET":
            stats.reset()
            print("OK", flush=True)
        elif command == "COUNT":
            print(stats.received, flush=True)
        elif command == "REPORT":
            closed = [c.close_code for c in connections if c.close_code is not None]
            report = {
                "received": stats.received,
                "gaps": stats.gaps,
                "missing": stats.missing,
                "latencies": stats.latencies,
                "first_at": stats.first_at,
                "last_at": stats.last_at,
                "closed": len(closed),
            }
            print(json.dumps(report), flush=True)
        elif command in ("QUIT", ""):
            break
    for connection in connections:
        if connection.transport is not None:
            connection.transport.disconnect()


if __name__ == "__main__":
    # uvloop: the generator spends its CPU on frames, not on the event loop, so the servers
    # (on the same cores) are what the benchmark measures.
    uvloop.run(main())
