"""The service as users run it: daphne processes started from the command line."""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
import time

import daphne.server
import pytest
from daphne.ws_protocol import WebSocketProtocol

from orchestrator_ws.server import GC_THRESHOLDS, Server, tune_garbage_collector
from tests.helpers import metric, wait_until
from tests.servers import PROJECT_DIR, DaphneServer, server_environment


def run_manage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=PROJECT_DIR, env=env, capture_output=True, text=True
    )


@pytest.mark.parametrize(
    "overrides, variable",
    [
        ({"DJANGO_SECRET_KEY": ""}, "DJANGO_SECRET_KEY"),
        ({"MAX_WORKERS": "many"}, "MAX_WORKERS"),
        ({"MAX_WORKERS": "0"}, "MAX_WORKERS"),
        ({"DJANGO_DEBUG": "perhaps"}, "DJANGO_DEBUG"),
    ],
)
def test_bad_configuration_stops_with_one_line_naming_the_variable(overrides, variable):
    env = server_environment("sqlite:////nonexistent/never-opened.sqlite3", **overrides)
    result = run_manage(env, "check")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("orchestrator-ws: configuration error: ")
    assert variable in lines[0]


def test_daphne_serves_the_api_end_to_end(database):
    server = DaphneServer(database.url).start()
    try:
        status, body = server.request("POST", "/api/processes/quick_steps", b'[{"name": "e2e"}]')
        assert status == 201, body
        process_id = json.loads(body)["id"]

        def completed():
            status, body = server.request("GET", f"/api/processes/{process_id}")
            return status == 200 and json.loads(body)["status"] == "completed"

        wait_until(completed, what="the process to complete over HTTP")

        status, body = server.request("PUT", "/api/settings/status", b'{"global_lock": true}')
        assert (status, json.loads(body)["global_status"]) == (200, "PAUSED")
        status, body = server.request("POST", "/api/processes/quick_steps", b"[]")
        assert status == 503
        status, body = server.request("PUT", "/api/settings/status", b'{"global_lock": false}')
        assert json.loads(body)["global_status"] == "RUNNING"
        status, _ = server.request("GET", "/api/processes/not-a-uuid")
        assert status == 400
        # The launcher set the collector up: its passes so far (importing Django made some).
        status, body = server.request("GET", "/metrics")
        assert status == 200
        assert 'orchestrator_ws_gc_pause_seconds_count{generation="0"}' in body.decode()
    finally:
        assert server.stop() == 0, server.log
    assert "Traceback" not in server.log


@pytest.fixture
def collector_restored():
    thresholds, callbacks = gc.get_threshold(), list(gc.callbacks)
    yield
    gc.set_threshold(*thresholds)
    gc.callbacks[:] = callbacks


def test_the_collector_runs_less_often_and_each_pass_is_timed(collector_restored):
    full_passes = "orchestrator_ws_gc_pause_seconds_count"
    before = metric(full_passes, generation="2")
    tune_garbage_collector()
    tune_garbage_collector()  # a second call adds no second timer
    assert gc.get_threshold() == GC_THRESHOLDS
    gc.collect()
    assert metric(full_passes, generation="2") == before + 1


@pytest.mark.django_db
def test_models_are_registered_in_the_admin(admin_client):
    for path in (
        "/admin/processes/process/",
        "/admin/processes/processstep/",
        "/admin/engine_status/enginesettings/",
    ):
        assert admin_client.get(path, HTTP_HOST="localhost").status_code == 200


async def test_the_server_reaps_only_connections_whose_application_ended_or_socket_closed(monkeypatch):
    """orchestrator_ws.server.Server runs daphne's reaping over the noted connections only,
    with daphne's rules: an ended application is dropped, a closed socket's application gets
    the close timeout, then the connection goes."""
    monkeypatch.setattr(daphne.server.reactor, "callLater", lambda *args: None)
    seen_by_daphne = []
    daphne_checker = daphne.server.Server.application_checker

    def checker(server):
        seen_by_daphne.append(set(server.connections))
        daphne_checker(server)

    monkeypatch.setattr(daphne.server.Server, "application_checker", checker)

    finish = {}

    async def application(scope, receive, send):
        finish[scope["name"]] = asyncio.Event()
        await finish[scope["name"]].wait()

    server = Server(application, endpoints=["tcp:port=0"], application_close_timeout=10)
    server.connections = {}
    ended, closed, idle = "ended", "closed", "idle"
    for protocol in (ended, closed, idle):
        server.protocol_connected(protocol)
        server.create_application(protocol, {"type": "websocket", "name": protocol})
    await asyncio.sleep(0)
    finish[ended].set()
    server.protocol_disconnected(closed)
    await asyncio.sleep(0.01)

    server.application_checker()
    assert seen_by_daphne[-1] == {ended, closed}
    assert "application_instance" not in server.connections[ended]  # reaped, socket still open
    assert not server.connections[closed]["application_instance"].done()  # within its close timeout
    assert set(server.connections) == {ended, closed, idle}

    server.connections[closed]["disconnected"] -= 60  # the close timeout passed
    server.application_checker()
    assert seen_by_daphne[-1] == {closed}
    await asyncio.sleep(0.01)
    assert server.connections[closed]["application_instance"].cancelled()

    server.protocol_disconnected(ended)
    server.application_checker()
    assert seen_by_daphne[-1] == {ended, closed}
    assert set(server.connections) == {idle}
    server.application_checker()
    assert seen_by_daphne[-1] == set()
    assert not server.connections[idle]["application_instance"].done()


def test_the_timeout_walk_skips_open_websockets_heard_from_within_the_ping_interval(monkeypatch):
    monkeypatch.setattr(daphne.server.reactor, "callLater", lambda *args: None)
    checked = []

    class Checked(WebSocketProtocol):
        def check_timeouts(self):
            checked.append(self)

    def websocket(state: int, silent_for: float) -> Checked:
        protocol = Checked()
        protocol.state, protocol.last_ping = state, time.time() - silent_for
        return protocol

    class HttpConnection:
        def check_timeouts(self):
            checked.append(self)

    chatty = websocket(WebSocketProtocol.STATE_OPEN, 5)
    quiet = websocket(WebSocketProtocol.STATE_OPEN, 61)
    connecting = websocket(WebSocketProtocol.STATE_CONNECTING, 0)
    http = HttpConnection()
    server = Server(None, endpoints=["tcp:port=0"], ping_interval=60, websocket_timeout=-1)
    server.connections = {protocol: {} for protocol in (chatty, quiet, connecting, http)}
    server.timeout_checker()
    assert checked == [quiet, connecting, http]

    checked.clear()
    server.websocket_timeout = 3600  # sessions have a time limit: every connection is checked
    server.timeout_checker()
    assert checked == [chatty, quiet, connecting, http]
