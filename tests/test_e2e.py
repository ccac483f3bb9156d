"""Two real daphne processes sharing one Redis and one database, real websocket clients.

A process started through server A must reach the clients of server B, in order, complete.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.clients import (
    LONG_STEPS,
    Collector,
    assert_clean_log,
    assert_contiguous,
    http,
    merged_steps,
    start_process,
)
from tests.servers import DaphneServer


@pytest.fixture
def servers(database, redis_url):
    env = {"PROCESS_LIST_COALESCE_MS": "0", "MAX_WORKERS": "5"}
    started = []
    try:
        for _ in range(2):
            started.append(DaphneServer(database.url, redis_url, **env).start())
        yield started
    finally:
        for server in started:
            assert server.stop() == 0, server.log
        for server in started:
            assert_clean_log(server)


async def test_process_started_on_one_server_reaches_clients_of_both(servers):
    a, b = servers
    lists = [await Collector(f"{s.ws}/api/processes/all/").start() for s in servers]
    events = [await Collector(f"{s.ws}/api/ws/events").start() for s in servers]
    engines = [await Collector(f"{s.ws}/api/settings/ws-status/").start() for s in servers]
    for engine in engines:
        await engine.wait_for(lambda f: len(f) >= 1, what="engine snapshot")

    process_id = await start_process(a, "long_running", [{"step_delay": 0.25}])
    details = [await Collector(f"{s.ws}/api/processes/{process_id}").start() for s in servers]

    for detail in details:
        await detail.wait_for(lambda f: f and f[-1].get("close"), what="the closing detail frame")
        assert await detail.wait_closed() == 1000
        assert merged_steps(detail.frames) == LONG_STEPS
        assert_contiguous(detail.frames)
        assert detail.frames[-1]["step"]["name"] == "Done"
        assert detail.frames[-1]["process"]["status"] == "completed"

    # created (Start), running, five slow steps, Done: eight list updates on both servers.
    for listing in lists:
        frames = await listing.wait_for(lambda f: len(f) >= 8, what="eight list updates")
        assert {f["process"]["id"] for f in frames} == {process_id}
        assert_contiguous(frames)
        assert frames[-1]["process"]["status"] == "completed"
    assert lists[0].frames == lists[1].frames  # the same text reached both servers' clients

    pair = [{"type": "processes", "id": "LIST"}, {"type": "processes", "id": process_id}]
    for event_client in events:
        frames = await event_client.wait_for(lambda f: len(f) >= 2 * len(LONG_STEPS), what="event pairs")
        assert all(f["name"] == "invalidateCache" for f in frames)
        assert [f["value"] for f in frames] == pair * len(LONG_STEPS)
        assert_contiguous(frames)

    # Lock while a process runs: both servers' engine clients see PAUSING, then PAUSED.
    paused_id = await start_process(b, "long_running", [{"step_delay": 0.5}])
    for engine in engines:
        await engine.wait_for(
            lambda f: f[-1]["engine-status"]["running_processes"] == 1, what="the run to start"
        )
    status, body = await asyncio.to_thread(http, a, "PUT", "/api/settings/status", {"global_lock": True})
    assert status == 200 and body["global_status"] == "PAUSING"
    for engine in engines:
        frames = await engine.wait_for(
            lambda f: f[-1]["engine-status"]["global_status"] == "PAUSED", what="PAUSED"
        )
        statuses = [f["engine-status"]["global_status"] for f in frames]
        assert statuses.index("PAUSING") < statuses.index("PAUSED")
        assert_contiguous(frames[1:])
    status, body = await asyncio.to_thread(http, b, "GET", f"/api/processes/{paused_id}")
    assert body["status"] == "running"
    await asyncio.to_thread(http, b, "PUT", "/api/settings/status", {"global_lock": False})
    for engine in engines:
        await engine.wait_for(lambda f: f[-1]["engine-status"]["global_status"] == "RUNNING", what="RUNNING")

    for client in [*lists, *events, *engines]:
        await client.close()


async def test_twenty_processes_on_five_workers_reach_every_client(servers):
    a, b = servers
    lists = [await Collector(f"{s.ws}/api/processes/all/").start() for s in servers for _ in range(2)]
    ids = await asyncio.gather(
        *(start_process(a if i % 2 else b, "long_running", [{"step_delay": 0.05}]) for i in range(20))
    )
    details = [
        await Collector(f"{servers[i % 2].ws}/api/processes/{process_id}").start()
        for i, process_id in enumerate(ids)
    ]
    for detail in details:
        await detail.wait_for(lambda f: f and f[-1].get("close"), timeout=60, what="the closing frame")
        assert await detail.wait_closed() == 1000
        assert merged_steps(detail.frames) == LONG_STEPS
        assert_contiguous(detail.frames)
    for listing in lists:
        frames = await listing.wait_for(lambda f: len(f) >= 20 * 8, timeout=60, what="every list update")
        assert len(frames) == 20 * 8
        assert_contiguous(frames)
        for process_id in ids:
            mine = [f["process"] for f in frames if f["process"]["id"] == process_id]
            assert len(mine) == 8 and mine[-1]["status"] == "completed"
    assert all(listing.frames == lists[0].frames for listing in lists)
    for listing in lists:
        await listing.close()


def redis_clients(url: str) -> int:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return len(client.client_list()) - 1  # not counting this one
    finally:
        client.close()


async def test_sigterm_closes_every_client_with_1001_and_exits(database, redis_url):
    redis_clients_before = redis_clients(redis_url)
    server = DaphneServer(database.url, redis_url).start()
    # Five one-second steps: still running when SIGTERM comes after the 200 clients connected.
    process_id = await start_process(server, "long_running", [{"step_delay": 1.0}])
    paths = [
        "/api/processes/all/",
        "/api/ws/events",
        "/api/settings/ws-status/",
        f"/api/processes/{process_id}",
    ]
    clients = [await Collector(f"{server.ws}{paths[i % len(paths)]}").start() for i in range(200)]
    await clients[-1].wait_for(lambda f: len(f) >= 1, what="a detail snapshot")
    assert clients[-1].close_code is None, "the process ended before the test could stop the server"

    began = time.monotonic()
    exit_code = await asyncio.to_thread(server.stop)
    took = time.monotonic() - began
    codes = [await client.wait_closed() for client in clients]
    assert exit_code == 0, server.log
    assert took < 10, f"daphne took {took:.1f}s to exit"
    assert codes == [1001] * 200, {code: codes.count(code) for code in set(codes)}
    assert "closing 200 websockets with 1001" in server.log
    assert "Traceback" not in server.log, server.log[-3000:]
    # The stopped instance left nothing in Redis: no subscription, no connection.
    assert redis_clients(redis_url) == redis_clients_before

    # The worker stopped at a step boundary, leaving the process resumable: the next server to
    # start picks it up and finishes it, with every step logged once.
    restarted = DaphneServer(database.url, redis_url).start()
    try:
        deadline = time.monotonic() + 30
        while True:
            status, body = await asyncio.to_thread(http, restarted, "GET", f"/api/processes/{process_id}")
            if body["status"] == "completed" or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert body["status"] == "completed"
        assert [s["name"] for s in body["steps"]] == LONG_STEPS
    finally:
        assert restarted.stop() == 0


def open_connections(database_url: str) -> int | None:
    """Connections PostgreSQL has open to this database (None on SQLite, which has no limit)."""
    if not database_url.startswith("postgresql"):
        return None
    import psycopg

    admin_url, name = database_url.rsplit("/", 1)
    with psycopg.connect(f"{admin_url}/postgres", autocommit=True) as conn:
        query = "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()"
        return conn.execute(query, [name]).fetchone()[0]


async def test_more_running_processes_than_database_connections_all_complete(database, redis_url):
    """Workers lend their connection to the pool while a step's function runs: 24 processes
    running at once on a server allowed 3 connections all finish, as fast as their steps allow.
    (Each worker holding its own, a hundred running processes took PostgreSQL's default
    max_connections, and the rest of the runs and requests failed with "too many clients".)"""
    server = DaphneServer(database.url, redis_url, MAX_WORKERS="24", DATABASE_POOL_SIZE="3").start()
    try:
        began = time.monotonic()
        ids = await asyncio.gather(
            *(start_process(server, "long_running", [{"step_delay": 0.2}]) for _ in range(24))
        )
        most_connections = 0
        while time.monotonic() - began < 30:
            connections = await asyncio.to_thread(open_connections, database.url)
            most_connections = max(most_connections, connections or 0)
            _, listing = await asyncio.to_thread(http, server, "GET", "/api/processes/?status=completed")
            if listing["count"] == len(ids):
                break
            await asyncio.sleep(0.05)
        took = time.monotonic() - began
        assert listing["count"] == len(ids)
        # Five steps of 0.2 s: about a second each, all at once. Three at a time (workers keeping
        # a connection while their steps sleep) would take eight.
        assert took < 5, f"{took:.1f}s"
        if database.url.startswith("postgresql"):
            assert 0 < most_connections <= 3
    finally:
        assert server.stop() == 0, server.log
    assert_clean_log(server)
