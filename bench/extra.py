"""The benchmark's other modes: idle connections, list coalescing, the cost of an enqueue."""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
import urllib.request

from tests.servers import DaphneServer, RedisServer, TemporaryDatabase


def _server_env(**extra: str) -> dict[str, str]:
    from bench.__main__ import SERVER_ENV

    return {**SERVER_ENV, **extra}


def idle(args) -> int:
    """10,000 idle connections on one daphne: memory per connection and CPU at rest."""
    from bench.__main__ import Fleet, cpu_seconds, rss

    redis_server = RedisServer().start()
    database = TemporaryDatabase().create()
    server = DaphneServer(database.url, redis_server.url, **_server_env()).start()
    fleet = None
    try:
        warm = Fleet([f"{server.ws}/api/processes/all/"], 10, 1, server.http)  # imports, pools, caches
        time.sleep(1)
        rss_before = rss([server])
        began = time.monotonic()
        per_process = 2000
        fleet = Fleet(
            [f"{server.ws}/api/processes/all/"],
            args.connections,
            max(1, args.connections // per_process),
            server.http,
            heartbeat=args.heartbeat,
        )
        connect_seconds = time.monotonic() - began
        time.sleep(5)
        rss_after = rss([server])
        per_connection_kb = (rss_after - rss_before) / args.connections / 1024
        full_gc_began = _full_gc_passes(server)  # read before the window: a request costs CPU
        cpu_began, idle_began = cpu_seconds([server]), time.monotonic()
        time.sleep(args.idle_seconds)
        idle_cpu = (cpu_seconds([server]) - cpu_began) / (time.monotonic() - idle_began) * 100
        full_gc_count, full_gc_seconds = (
            now - then for now, then in zip(_full_gc_passes(server), full_gc_began, strict=True)
        )
        open_now = _metric(server, 'orchestrator_ws_open_connections{group="process-list"}')
        print()
        print(
            f"{args.connections:,} idle connections on one daphne process (Redis layer), "
            + (
                f"each client sends __ping__ every {args.heartbeat:g} s"
                if args.heartbeat
                else "no client heartbeat (daphne pings a connection silent for 60 s)"
            )
        )
        print()
        print(
            "| connections open | connect time s | RSS growth per connection KB | idle CPU % of a core "
            f"(over {args.idle_seconds:.0f} s) | full GC passes (their pause ms) |"
        )
        print("|---|---|---|---|---|")
        print(
            f"| {open_now:,.0f} | {connect_seconds:.1f} | {per_connection_kb:.1f} | {idle_cpu:.1f} "
            f"| {full_gc_count:.0f} ({full_gc_seconds * 1000:.0f}) |"
        )
        print()
        warm.quit()
        ok = per_connection_kb <= 30 and idle_cpu < 5 and open_now >= args.connections
        return 0 if ok or not args.check else 1
    finally:
        if fleet is not None:
            fleet.quit()
        server.stop()
        redis_server.stop()
        database.drop()


def _full_gc_passes(server: DaphneServer) -> tuple[float, float]:
    """How many full garbage collections the server has run, and their seconds in all."""
    name = 'orchestrator_ws_gc_pause_seconds_{}{{generation="2"}}'
    count, seconds = _metrics(server, name.format("count"), name.format("sum"))
    return count, seconds


def _metric(server: DaphneServer, name: str) -> float:
    return _metrics(server, name)[0]


def _metrics(server: DaphneServer, *names: str) -> list[float]:
    """Samples of the server's /metrics, read once (0 for a sample not there yet)."""
    text = urllib.request.urlopen(server.http + "/metrics", timeout=10).read().decode()
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return [float(samples.get(name, 0.0)) for name in names]


def _completed(server: DaphneServer) -> int:
    status, body = server.request("GET", "/api/processes/?status=completed&limit=1")
    return json.loads(body)["count"] if status == 200 else 0


COALESCE_WORKERS = 10


def coalesce(args) -> int:
    """What list coalescing saves when 200 processes run at once."""
    from bench import LIST_MESSAGES_PER_PROCESS, TICKS
    from bench.__main__ import start_processes

    rows = []
    for interval in (0.0, 0.05):
        for window_ms in (0, 100):
            redis_server = RedisServer().start()
            database = TemporaryDatabase().create()
            server = DaphneServer(
                database.url,
                redis_server.url,
                # The fan-out's 256 workers would run all 200 at once; ten, as the table says.
                **_server_env(PROCESS_LIST_COALESCE_MS=str(window_ms), MAX_WORKERS=str(COALESCE_WORKERS)),
            ).start()
            try:
                start_processes([server], args.processes, interval)
                name = 'orchestrator_ws_messages_broadcast_total{group="process-list"}'
                expected_updates = args.processes * LIST_MESSAGES_PER_PROCESS
                deadline = time.monotonic() + 180
                while _completed(server) < args.processes and time.monotonic() < deadline:
                    time.sleep(0.5)
                time.sleep(1.5)  # the broadcast queue drains, the last coalescing windows close
                rows.append((interval, window_ms, expected_updates, _metric(server, name)))
            finally:
                server.stop()
                redis_server.stop()
                database.drop()
    print()
    print(
        f"{args.processes} bench_ticks processes started at once ({TICKS} steps each), "
        f"one daphne, MAX_WORKERS={COALESCE_WORKERS}"
    )
    print()
    print("| step interval | coalescing window | process changes | process-list messages | saved |")
    print("|---|---|---|---|---|")
    for interval, window_ms, updates, sent in rows:
        saved = 1 - sent / updates if updates else 0
        print(f"| {interval * 1000:.0f} ms | {window_ms} ms | {updates:,} | {sent:,.0f} | {saved:.0%} |")
    print()
    return 0


def enqueue(args) -> int:
    """What a worker pays to announce a step: a queue put, whatever Redis is doing."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orchestrator_ws.settings")
    os.environ.setdefault("DJANGO_DEBUG", "1")

    import django

    django.setup()
    from orchestrator_ws.realtime.redis_layer import RedisFanoutLayer
    from processes.process_data_broadcast import ProcessDataBroadcastThread

    redis_server = RedisServer().start()
    rows = []
    try:
        layer = RedisFanoutLayer(url=redis_server.url, command_timeout=0.5)
        thread = ProcessDataBroadcastThread(layer, max_queue=10_000, list_coalesce_seconds=0)
        thread.start()
        for label, paused in (("Redis answering", False), ("Redis paused (SIGSTOP)", True)):
            if paused:
                redis_server.pause()
            for workers in (1, 8):
                rows.append((label, workers, *_enqueue_costs(thread, args.enqueues, workers)))
            if paused:
                redis_server.resume()
        thread.stop(10)
    finally:
        redis_server.resume()
        redis_server.stop()
    print()
    print("broadcast_process() while the broadcast thread consumes (a full queue drops its oldest).")
    print("Wall time includes waiting for the GIL, which busy threads take turns at; CPU time is")
    print("what the enqueue itself costs the worker.")
    print()
    print("| Redis | worker threads | enqueues | wall p50 µs | wall p99 µs | CPU mean µs | CPU p99 µs |")
    print("|---|---|---|---|---|---|---|")
    for label, workers, count, wall_p50, wall_p99, cpu_mean, cpu_p99 in rows:
        print(
            f"| {label} | {workers} | {count:,} | {wall_p50 * 1e6:.1f} | {wall_p99 * 1e6:.1f} | "
            f"{cpu_mean * 1e6:.1f} | {cpu_p99 * 1e6:.1f} |"
        )
    print()
    return 0


def _enqueue_costs(thread, enqueues: int, workers: int):
    """(count, wall p50, wall p99, CPU mean, CPU p99) of enqueues from ``workers`` threads."""
    import uuid

    wall: list[float] = []
    cpu: list[float] = []
    lock = threading.Lock()

    def work() -> None:
        mine_wall, mine_cpu = [], []
        for _ in range(enqueues // workers):
            began, began_cpu = time.perf_counter(), time.thread_time()
            thread.broadcast_process(uuid.uuid4(), status="running", step_id=uuid.uuid4())
            mine_cpu.append(time.thread_time() - began_cpu)
            mine_wall.append(time.perf_counter() - began)
        with lock:
            wall.extend(mine_wall)
            cpu.extend(mine_cpu)

    running = [threading.Thread(target=work) for _ in range(workers)]
    for worker in running:
        worker.start()
    for worker in running:
        worker.join()
    wall_q = statistics.quantiles(wall, n=100)
    cpu_q = statistics.quantiles(cpu, n=100)
    return len(wall), wall_q[49], wall_q[98], statistics.mean(cpu), cpu_q[98]
