"""Real websocket clients for end-to-end tests (the ``websockets`` library) and HTTP helpers."""

from __future__ import annotations

import asyncio
import bisect
import itertools
import json
import time
from datetime import datetime

import websockets
from websockets.exceptions import ConnectionClosed

from tests.servers import DaphneServer


class Collector:
    """A websocket client that records every frame until the server closes it."""

    def __init__(self, url: str, **connect_kwargs):
        self.url = url
        # A browser's Origin: the server refuses websockets from origins it does not know.
        connect_kwargs.setdefault("origin", url.replace("ws://", "http://", 1).split("/api/")[0])
        self.connect_kwargs = connect_kwargs
        self.frames: list = []
        self.received_at: list[float] = []  # wall-clock time each frame arrived
        self.close_code: int | None = None
        self._task: asyncio.Task | None = None
        self.ws = None

    async def start(self) -> Collector:
        self.ws = await websockets.connect(self.url, **self.connect_kwargs)
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        try:
            async for text in self.ws:
                self._record(time.time(), text)
        except ConnectionClosed:
            pass  # closed without a close frame: close_code tells (1006)
        finally:
            self.close_code = self.ws.close_code

    def _record(self, received_at: float, text: str) -> None:
        self.received_at.append(received_at)
        self.frames.append(json.loads(text) if text.startswith("{") else text)

    async def wait_for(self, predicate, timeout: float = 20, what: str = "") -> list:
        deadline = time.monotonic() + timeout
        while not predicate(self.frames):
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.url}: timed out waiting for {what}; got {self.frames[-5:]}")
            await asyncio.sleep(0.02)
        return self.frames

    async def wait_closed(self, timeout: float = 10) -> int:
        await asyncio.wait_for(asyncio.shield(self._task), timeout)
        return self.close_code

    async def close(self) -> None:
        await self.ws.close()
        await self._task


class LatencyRecorder(Collector):
    """A process-list client that keeps, of each process update, only when it arrived and how
    long after the change's commit (``last_modified_at``); other frames are dropped.

    Keeping every frame, as a Collector does, leaves the garbage collector hundreds of
    thousands of objects to walk: its full passes stalled this process's event loop for 150-200
    ms every ten seconds or so, latency the server never caused but the p99 counted.
    """

    def __init__(self, url: str, **connect_kwargs):
        super().__init__(url, **connect_kwargs)
        self.latencies: list[float] = []

    def _record(self, received_at: float, text: str) -> None:
        frame = json.loads(text) if text.startswith("{") else {}
        changed_at = frame.get("process", {}).get("last_modified_at")
        if changed_at is None:
            return
        self.received_at.append(received_at)
        self.latencies.append(received_at - datetime.fromisoformat(changed_at).timestamp())

    def latencies_since(self, since: float) -> list[float]:
        """The latencies of the updates received after ``since`` (a wall-clock time)."""
        start = bisect.bisect_right(self.received_at, since)
        return self.latencies[start:]


def http(server: DaphneServer, method: str, path: str, body=None):
    data = json.dumps(body).encode() if body is not None else None
    status, payload = server.request(method, path, data)
    return status, json.loads(payload) if payload else None


def post_process(server: DaphneServer, workflow: str, inputs: list) -> str:
    """Starts a process over HTTP; its id."""
    status, body = http(server, "POST", f"/api/processes/{workflow}", inputs)
    assert status == 201, body
    return body["id"]


async def start_process(server: DaphneServer, workflow: str, inputs: list) -> str:
    return await asyncio.to_thread(post_process, server, workflow, inputs)


def assert_contiguous(frames):
    """Each frame's seq follows the previous one's, except a resync's: it restarts the stream at
    a later seq (a detail stream gets one when the broadcast thread sent a resync marker for a
    detail it saw nobody watching as the client joined)."""
    seqs = [f["seq"] for f in frames]
    for previous, frame in itertools.pairwise(frames):
        if frame.get("resync"):
            assert frame["seq"] > previous["seq"], seqs
        else:
            assert frame["seq"] == previous["seq"] + 1, seqs


def merged_steps(frames):
    """Step names of a detail stream, merged by step_id (the snapshot may hold the next step)."""
    steps = {}
    for frame in frames:
        for step in [*frame["process"]["steps"], *([frame["step"]] if "step" in frame else [])]:
            if step["status"] != "pending":
                steps.setdefault(step["step_id"], step["name"])
    return list(steps.values())


LONG_STEPS = ["Start", *(f"Slow step {i}" for i in range(1, 6)), "Done"]


def assert_clean_log(server: DaphneServer) -> None:
    """No traceback or asyncio error in a server's output."""
    log = server.log
    assert "Traceback" not in log, log[-3000:]
    assert "RuntimeError" not in log and "Task exception" not in log, log[-3000:]
