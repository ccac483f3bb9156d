"""A websocket client for in-process consumer tests, on channels' WebsocketCommunicator."""

from __future__ import annotations

import json

from channels.testing import WebsocketCommunicator

from orchestrator_ws.routing import websocket_application

BROWSER_ORIGIN = (b"origin", b"http://localhost:8000")


class WsClient:
    """A client of the production websocket stack; sends a browser's Origin unless told otherwise."""

    def __init__(self, path: str, headers=(BROWSER_ORIGIN,), client=("127.0.0.1", 50000), **kwargs):
        self.communicator = WebsocketCommunicator(
            websocket_application(), path, headers=list(headers), **kwargs
        )
        # The scope is read when the application runs, on connect: give it a peer address.
        self.communicator.scope["client"] = list(client)
        self.subprotocol = None

    async def connect(self) -> tuple[bool, object]:
        connected, detail = await self.communicator.connect(timeout=5)
        self.subprotocol = detail if connected else None
        return connected, detail

    async def frame(self, timeout: float = 5) -> dict:
        return json.loads(await self.communicator.receive_from(timeout=timeout))

    async def text(self, timeout: float = 5) -> str:
        return await self.communicator.receive_from(timeout=timeout)

    async def frames_until(self, predicate, timeout: float = 10) -> list[dict]:
        """Frames up to and including the first one ``predicate`` accepts."""
        frames = []
        while True:
            frames.append(await self.frame(timeout))
            if predicate(frames[-1]):
                return frames

    async def send(self, text: str) -> None:
        await self.communicator.send_to(text_data=text)

    async def closed_with(self, timeout: float = 5) -> int:
        """Wait for the server to close; returns the close code."""
        while True:
            output = await self.communicator.receive_output(timeout)
            if output["type"] == "websocket.close":
                return output.get("code", 1000)

    async def nothing(self, timeout: float = 0.3) -> bool:
        return await self.communicator.receive_nothing(timeout=timeout)

    async def disconnect(self) -> None:
        await self.communicator.disconnect()
