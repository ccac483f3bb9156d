"""The reference the benchmark measures the project against: the least a fan-out can do.

A raw ASGI application, run on daphne like the project: one Redis subscription per server
process, and each published message written to every local websocket in a loop over ``send``.
No channel layer, no consumers, no sequence numbers beyond what the publisher puts in the text.

    REDIS_URL=redis://127.0.0.1:6379/0 daphne bench.raw_fanout:application
"""

from __future__ import annotations

import asyncio
import os

import redis.asyncio as aioredis

CHANNEL = "bench:raw-fanout"

_sends: set = set()
_subscriber: asyncio.Task | None = None


async def _forward_forever() -> None:
    client = aioredis.Redis.from_url(os.environ["REDIS_URL"])
    pubsub = client.pubsub()
    await pubsub.subscribe(CHANNEL)
    async for message in pubsub.listen():
        if message["type"] == "message":
            text = message["data"].decode()
            for send in list(_sends):
                await send({"type": "websocket.send", "text": text})


async def application(scope, receive, send):
    global _subscriber
    if scope["type"] != "websocket":
        await receive()
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    if _subscriber is None:
        _subscriber = asyncio.ensure_future(_forward_forever())
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    _sends.add(send)
    try:
        while True:
            event = await receive()
            if event["type"] == "websocket.disconnect":
                return
            if event.get("text") == "__ping__":
                await send({"type": "websocket.send", "text": "__pong__"})
    finally:
        _sends.discard(send)
