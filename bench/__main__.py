"""Fan-out benchmark: the project's layer against channels_redis's stock layers and a raw ASGI
reference, side by side, on daphne, driven through the real worker path.

    python -m bench                    # the comparison table (about two minutes)
    python -m bench --quick --check    # CI's smoke run: small, fails on any lost message
    python -m bench idle               # 10,000 idle connections on one daphne: RSS and CPU
    python -m bench coalesce           # what list coalescing saves with 200 processes at once
    python -m bench enqueue            # what a worker pays to enqueue a broadcast

For each layer the benchmark starts a private Redis, N daphne processes on free ports sharing
one SQLite database, and C clients spread over several client processes (bench/client.py), all
following the process-list group. Then:

1. burst: P processes of ``bench_ticks`` (9 steps, no delay) are started, and all take their
   first step at one agreed moment; from then on every step is a list message that each client
   must receive. Deliveries/s = messages received by all clients / time from that moment to
   the last delivery; a short burst is run five times and the median counts. (The raw
   reference gets the same number of messages, of the same size, published straight to Redis.)
   Bursts stay under 100 messages: the stock RedisChannelLayer drops what exceeds a channel's
   capacity (100) by design, which is not what is measured.
2. latency: half the burst's message rate (or each rate given with ``--latency-rate``, one run
   after the other on the same servers and clients), sustained for a few seconds through the same path;
   latency = arrival at the client minus the change's commit time (``last_modified_at``), which
   the worker stamps just before it enqueues the broadcast.

Where the latency goes: for the project's layer a subscriber of the bench's own watches the
process-list group's Redis channel, so the table also gives the latency up to the broker
(commit -> publish seen at Redis), the rest being the servers' fan-out and the clients; and the
whole machine's CPU use during the latency run, since everything shares the same cores.

Loss is counted from the per-group ``seq`` where frames carry it (the project, raw), and from
counts everywhere: a client that got fewer messages than were sent lost the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

import psutil
import redis

from bench import LIST_MESSAGES_PER_PROCESS, TICKS
from bench.raw_fanout import CHANNEL as RAW_CHANNEL
from tests.servers import PROJECT_DIR, DaphneServer, RedisServer, TemporaryDatabase

# List messages of a started process from its first tick on: the ticks and Done.
TICKS_MESSAGES = TICKS + 1

LAYERS = {
    "project": {"CHANNEL_LAYER": "fanout"},
    "stock RedisChannelLayer": {"CHANNEL_LAYER": "redis"},
    "stock RedisPubSubChannelLayer": {"CHANNEL_LAYER": "redis-pubsub"},
    "raw ASGI reference": None,
}
# Every process of the latency run sleeps between its ticks on a worker thread of its own, so a
# server needs a worker for each of its share (see latency_processes); the pool only starts the
# threads it uses. 256 is the most MAX_WORKERS takes.
WORKERS_PER_SERVER = 256
SERVER_ENV = {
    "PROCESS_LIST_COALESCE_MS": "0",  # every step is a list message (coalescing is measured apart)
    "MAX_WORKERS": str(WORKERS_PER_SERVER),
    "WS_MAX_CONNECTIONS_PER_IP": "0",
    "LOG_LEVEL": "WARNING",
    "WORKFLOW_MODULES": "processes.demo_workflows,bench.workflows",
}


def percentile_cells(latencies: list[float], *qs: float) -> str:
    """The ``qs`` percentiles of ``latencies`` in ms, as table cells (nan for under two)."""
    if len(latencies) < 2:
        return " | ".join(f"{math.nan:.1f}" for _ in qs)
    cuts = statistics.quantiles(latencies, n=100)
    return " | ".join(f"{cuts[int(q * 100) - 1] * 1000:.1f}" for q in qs)


@dataclass
class LatencyRun:
    """One sustained run at ``rate`` messages/s (step 2 of the module docstring)."""

    rate: float
    sent: int = 0
    received: int = 0
    latencies: list[float] = field(default_factory=list)
    broker_latencies: list[float] = field(default_factory=list)  # commit -> seen at Redis
    machine_cpu_percent: float = math.nan  # all cores
    seq_gaps: int = 0

    @property
    def lost(self) -> int:
        return max(0, self.sent - self.received)


@dataclass
class Result:
    layer: str
    deliveries_per_s: float = 0.0
    burst_sent: int = 0
    burst_received: int = 0
    latency_runs: list[LatencyRun] = field(default_factory=list)
    seq_gaps: int = 0
    rss_per_connection_kb: float = 0.0
    server_cpu_us: float = 0.0  # server CPU per delivery in the median burst
    client_cpu_us: float = 0.0  # the load generator's CPU per delivery, same burst

    @property
    def lost(self) -> int:
        return max(0, self.burst_sent - self.burst_received) + sum(run.lost for run in self.latency_runs)


class ClientProcess:
    """One bench/client.py process and its command pipe."""

    def __init__(self, urls: list[str], connections: int, origin: str, heartbeat: float = 0):
        command = [sys.executable, "-m", "bench.client", "--connections", str(connections)]
        command += ["--origin", origin, "--heartbeat", str(heartbeat)]
        for url in urls:
            command += ["--url", url]
        self.process = subprocess.Popen(
            command, cwd=PROJECT_DIR, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def expect(self, word: str) -> None:
        line = self.process.stdout.readline().strip()
        if line != word:
            raise RuntimeError(f"client process said {line!r}, expected {word}")

    def command(self, word: str) -> str:
        self.process.stdin.write(word + "\n")
        self.process.stdin.flush()
        return self.process.stdout.readline()

    def report(self) -> dict:
        return json.loads(self.command("REPORT"))

    def received(self) -> int:
        return int(self.command("COUNT"))

    def quit(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.process.stdin.write("QUIT\n")
            self.process.stdin.flush()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


class Fleet:
    """All client processes together."""

    def __init__(self, urls: list[str], connections: int, processes: int, origin: str, heartbeat: float = 0):
        share = [connections // processes + (i < connections % processes) for i in range(processes)]
        self.clients = [ClientProcess(urls, n, origin, heartbeat) for n in share if n]
        for client in self.clients:
            client.expect("READY")

    def reset(self) -> None:
        for client in self.clients:
            client.command("RESET")

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.clients)

    def reports(self) -> list[dict]:
        return [client.report() for client in self.clients]

    def wait_for(self, expected: int, timeout: float, quiet: float = 3.0) -> list[dict]:
        """Until ``expected`` frames arrived in all, or nothing arrived for ``quiet`` seconds;
        then the reports.

        Polled with COUNT, not REPORT: a report carries every latency sample so far, and
        encoding thousands of floats five times a second stalled the clients' event loops more
        the longer a run went, which showed as latency at the end of the run.
        """
        deadline = time.monotonic() + timeout
        last_total, last_change = -1, time.monotonic()
        while True:
            total = sum(client.received() for client in self.clients)
            now = time.monotonic()
            if total != last_total:
                last_total, last_change = total, now
            if total >= expected or now - last_change > quiet or now > deadline:
                return self.reports()
            time.sleep(0.2)

    def quit(self) -> None:
        for client in self.clients:
            client.quit()


def cpu_seconds(runners: Iterable[DaphneServer | ClientProcess]) -> float:
    """User plus system CPU seconds the runners' processes have used so far."""
    total = 0.0
    for runner in runners:
        times = psutil.Process(runner.process.pid).cpu_times()
        total += times.user + times.system
    return total


def rss(servers: list[DaphneServer]) -> int:
    return sum(psutil.Process(server.process.pid).memory_info().rss for server in servers)


def start_processes(
    servers: list[DaphneServer], count: int, interval: float, start_at: float = 0.0, stagger: float = 0.0
) -> None:
    """``count`` bench_ticks processes, spread over the servers, started concurrently; process
    ``i`` takes its first tick at ``start_at + i * stagger`` and its last ``i * stagger`` later
    than its interval alone would put it (see bench/workflows.py)."""

    def one(index: int) -> None:
        form = {"interval": interval, "start_at": start_at + index * stagger, "last_delay": index * stagger}
        body = json.dumps([form]).encode()
        status, payload = servers[index % len(servers)].request("POST", "/api/processes/bench_ticks", body)
        if status != 201:
            raise RuntimeError(f"starting a process failed: {status} {payload[:200]!r}")

    with ThreadPoolExecutor(max_workers=min(count, 16)) as pool:
        list(pool.map(one, range(count)))


def latency_processes(rate: float, seconds: float, servers: int) -> int:
    """How many bench_ticks processes carry a latency run of ``rate`` messages/s.

    They all run for the whole run, each on a worker thread: a process queued behind a full
    pool would tick late and its messages would be counted as lost, so a run that needs more
    workers than the servers have is refused instead.
    """
    processes = max(1, math.ceil(rate * seconds / TICKS_MESSAGES))
    if math.ceil(processes / servers) > WORKERS_PER_SERVER:
        raise SystemExit(
            f"a latency run of {seconds:g} s at {rate:g} messages/s needs {processes} processes "
            f"running at once, more than {servers} servers with {WORKERS_PER_SERVER} workers "
            "each can hold: shorten --latency-seconds, lower --latency-rate or add --servers"
        )
    return processes


RAW_TEMPLATE = None


def raw_message(seq: int) -> str:
    """A frame the size and shape of a project list frame, stamped now."""
    global RAW_TEMPLATE
    if RAW_TEMPLATE is None:
        summary = {
            "process_id": "00000000-0000-4000-8000-000000000000",
            "workflow_name": "bench_ticks",
            "workflow_target": "SYSTEM",
            "is_task": True,
            "last_status": "running",
            "last_step": "Tick 10",
            "assignee": "SYSTEM",
            "failed_reason": None,
            "created_by": "anonymous",
            "started_at": "2026-11-28T00:00:00.000000+00:00",
            "last_modified_at": "@STAMP@",
            "id": "00000000-0000-4000-8000-000000000000",
            "status": "running",
            "step": "Tick 10",
        }
        RAW_TEMPLATE = json.dumps({"process": summary}, separators=(",", ":"))[1:]
    stamp = datetime.now(UTC).isoformat()
    return f'{{"seq":{seq},' + RAW_TEMPLATE.replace("@STAMP@", stamp)


class RawPublisher:
    """Publishes reference frames straight to Redis, flat out or at a rate."""

    def __init__(self, url: str):
        self.client = redis.Redis.from_url(url)
        self.seq = 0

    def publish(self, count: int, rate: float | None = None) -> None:
        began = time.monotonic()
        for n in range(count):
            if rate:
                delay = began + n / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            self.seq += 1
            self.client.publish(RAW_CHANNEL, raw_message(self.seq))


class BrokerProbe:
    """Subscribes to the project's process-list channel in Redis and notes, for each message,
    how long after its commit (``last_modified_at``) Redis delivered it: the part of the
    latency spent before the servers' fan-out."""

    STAMP = re.compile(rb"last_modified_at\W+(\d{4}-\d\d-\d\dT[\d:.]+(?:[+-]\d\d:\d\d)?)")

    def __init__(self, url: str):
        self.latencies: list[float] = []
        self._pubsub = redis.Redis.from_url(url).pubsub(ignore_subscribe_messages=True)
        self._pubsub.psubscribe("*:group:process-list")
        threading.Thread(target=self._listen, name="broker-probe", daemon=True).start()

    def _listen(self) -> None:
        with contextlib.suppress(redis.RedisError, ValueError):
            for message in self._pubsub.listen():
                now = time.time()
                stamp = self.STAMP.search(message["data"])
                if stamp:
                    self.latencies.append(now - datetime.fromisoformat(stamp.group(1).decode()).timestamp())

    def take(self) -> list[float]:
        """The latencies noted since the last take, and a fresh start."""
        latencies, self.latencies = self.latencies, []
        return latencies


def measure_latency(
    rate: float,
    args,
    servers: list[DaphneServer],
    fleet: Fleet,
    publisher: RawPublisher | None,
    probe: BrokerProbe | None,
) -> LatencyRun:
    run = LatencyRun(rate)
    if publisher is not None:
        sent = int(rate * args.latency_seconds)
        fleet.reset()
        psutil.cpu_percent()  # the machine's CPU use from here
        publisher.publish(sent, rate)
    else:
        # Ticks evenly spread, like the raw reference's publisher: process i ticks at
        # start_at + i/rate + k*processes/rate, so the group gets one message every 1/rate s.
        # Done follows a process's last tick at once, so the last ticks come i/rate later
        # still: those pairs of messages arrive at half the rate and the group's stays even.
        # As in a burst, what is counted starts with the first tick.
        processes = latency_processes(rate, args.latency_seconds, len(servers))
        sent = processes * TICKS_MESSAGES
        start_at = time.time() + 1 + 0.05 * processes
        start_processes(servers, processes, processes / rate, start_at, stagger=1 / rate)
        time.sleep(max(0.0, start_at - time.time() - 0.2))
        fleet.reset()
        if probe is not None:
            probe.take()  # not the processes' start
        psutil.cpu_percent()  # the machine's CPU use from here
    reports = fleet.wait_for(sent * args.clients, timeout=args.latency_seconds * 4 + 10)
    # wait_for ends a moment after the last delivery (its next poll), which barely dilutes this.
    run.machine_cpu_percent = psutil.cpu_percent()
    if probe is not None:
        run.broker_latencies = probe.take()  # not the next run's start
    run.sent = sent * args.clients
    run.received = sum(r["received"] for r in reports)
    run.latencies = [latency for r in reports for latency in r["latencies"]]
    run.seq_gaps = sum(r["gaps"] for r in reports)
    return run


def run_layer(name: str, args) -> Result:
    result = Result(name)
    layer_env = LAYERS[name]
    redis_server = RedisServer().start()
    database = TemporaryDatabase().create() if layer_env is not None else None
    servers: list[DaphneServer] = []
    fleet = None
    try:
        for _ in range(args.servers):
            if layer_env is None:
                server = DaphneServer("sqlite://:memory:", redis_server.url)
                server.command = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(server.port)]
                server.command.append("bench.raw_fanout:application")
            else:
                server = DaphneServer(database.url, redis_server.url, **SERVER_ENV, **layer_env)
            servers.append(server.start())
        path = "/" if layer_env is None else "/api/processes/all/"
        urls = [f"{server.ws}{path}" for server in servers]
        rss_before = rss(servers)
        fleet = Fleet(urls, args.clients, args.client_processes, servers[0].http)
        time.sleep(1)
        result.rss_per_connection_kb = (rss(servers) - rss_before) / args.clients / 1024
        publisher = RawPublisher(redis_server.url) if layer_env is None else None
        probe = BrokerProbe(redis_server.url) if layer_env == LAYERS["project"] else None

        # 1. burst: the processes are started first and all tick from one moment, so what is
        # measured is the path from the workers on, flat out (not how fast HTTP starts them).
        # Five bursts (one if it is long: the stock layers); the median counts.
        ticks = args.burst_processes * TICKS_MESSAGES
        bursts = []
        for _ in range(5):
            if publisher is None:
                start_at = time.time() + 1 + 0.15 * args.burst_processes
                start_processes(servers, args.burst_processes, 0.0, start_at)
                time.sleep(max(0.0, start_at - time.time() - 0.2))
            fleet.reset()
            began = start_at if publisher is None else time.time()
            cpu_began, clients_began = cpu_seconds(servers), fleet.cpu_seconds()
            if publisher is not None:
                publisher.publish(ticks)
            reports = fleet.wait_for(ticks * args.clients, timeout=args.burst_timeout)
            last = max((r["last_at"] or began) for r in reports)
            elapsed = max(last - began, 1e-6)
            received = sum(r["received"] for r in reports)
            result.burst_sent += ticks * args.clients
            result.burst_received += received
            result.seq_gaps += sum(r["gaps"] for r in reports)
            server_cpu = (cpu_seconds(servers) - cpu_began) / max(received, 1) * 1e6
            client_cpu = (fleet.cpu_seconds() - clients_began) / max(received, 1) * 1e6
            bursts.append((received / elapsed, server_cpu, client_cpu))
            time.sleep(1)
            if elapsed > 5:
                break
        bursts.sort()
        result.deliveries_per_s, result.server_cpu_us, result.client_cpu_us = bursts[len(bursts) // 2]

        # 2. latency at half the burst's message rate, or at each rate asked for
        for rate in args.latency_rate or [max(0.5, 0.5 * result.deliveries_per_s / args.clients)]:
            run = measure_latency(rate, args, servers, fleet, publisher, probe)
            result.latency_runs.append(run)
            result.seq_gaps += run.seq_gaps
    finally:
        if fleet is not None:
            fleet.quit()
        for server in servers:
            server.stop()
        redis_server.stop()
        if database is not None:
            database.drop()
    return result


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = psutil.virtual_memory().total / 2**30
    return (
        f"{os.cpu_count()} cores ({cpu}), {memory:.0f} GiB, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def print_table(results: list[Result], args) -> None:
    by_name = {r.layer: r for r in results}
    stock = by_name.get("stock RedisChannelLayer")
    raw = by_name.get("raw ASGI reference")
    print()
    print(
        f"{args.clients} clients on the process-list group, {args.servers} daphne processes, "
        f"{args.client_processes} client processes; {machine()}"
    )
    print()
    print(
        "| layer | deliveries/s | vs stock RedisChannelLayer | vs raw | latency at msgs/s | p50 ms "
        "| p95 ms | p99 ms | lost | seq gaps | RSS/conn KB | server CPU µs/delivery "
        "| clients' CPU µs/delivery |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        vs_stock = (
            f"{r.deliveries_per_s / stock.deliveries_per_s:.1f}x" if stock and stock.deliveries_per_s else "-"
        )
        vs_raw = f"{r.deliveries_per_s / raw.deliveries_per_s:.2f}x" if raw and raw.deliveries_per_s else "-"
        first = r.latency_runs[0] if r.latency_runs else LatencyRun(math.nan)
        print(
            f"| {r.layer} | {r.deliveries_per_s:,.0f} | {vs_stock} | {vs_raw} | {first.rate:.1f} | "
            f"{percentile_cells(first.latencies, 0.50, 0.95, 0.99)} | {r.lost:,} | {r.seq_gaps} | "
            f"{r.rss_per_connection_kb:.1f} | {r.server_cpu_us:.1f} | {r.client_cpu_us:.1f} |"
        )
    print()
    print("Latency runs: the part up to the broker (project only) and the whole machine's CPU use")
    print()
    print(
        "| layer | msgs/s | p50 ms | p95 ms | p99 ms | lost | commit -> Redis p50 ms "
        "| commit -> Redis p99 ms | machine CPU % |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        for run in r.latency_runs:
            broker = percentile_cells(run.broker_latencies, 0.50, 0.99) if run.broker_latencies else "- | -"
            print(
                f"| {r.layer} | {run.rate:.1f} | {percentile_cells(run.latencies, 0.50, 0.95, 0.99)} | "
                f"{run.lost:,} | {broker} | {run.machine_cpu_percent:.0f} |"
            )
    print()


def fanout(args) -> int:
    names = [n for n in LAYERS if n in args.layers] if args.layers else list(LAYERS)
    results = []
    for name in names:
        print(f"== {name}", flush=True)
        results.append(run_layer(name, args))
    print_table(results, args)
    if args.check:
        lost = {r.layer: r.lost for r in results if r.lost or r.seq_gaps}
        if lost:
            print(f"LOSS: {lost}")
            return 1
        print("no message lost")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "mode", nargs="?", default="fanout", choices=["fanout", "idle", "coalesce", "enqueue"]
    )
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--client-processes", type=int, default=4)
    parser.add_argument(
        "--burst-processes", type=int, default=8, help=f"each sends {LIST_MESSAGES_PER_PROCESS} list messages"
    )
    parser.add_argument("--burst-timeout", type=float, default=40)
    parser.add_argument("--latency-seconds", type=float, default=5)
    parser.add_argument(
        "--latency-rate",
        type=float,
        nargs="+",
        default=[],
        metavar="RATE",
        help="messages/s of the latency run; several: a run at each (default: half the burst's)",
    )
    parser.add_argument("--layers", nargs="*", choices=list(LAYERS), help="default: all")
    parser.add_argument("--connections", type=int, default=10_000, help="idle mode")
    parser.add_argument("--idle-seconds", type=float, default=30, help="idle mode: CPU measured over")
    parser.add_argument("--heartbeat", type=float, default=30, help="idle mode: __ping__ every N s (0: none)")
    parser.add_argument("--processes", type=int, default=200, help="coalesce mode")
    parser.add_argument("--enqueues", type=int, default=200_000, help="enqueue mode")
    parser.add_argument("--quick", action="store_true", help="CI smoke: 40 clients, the project only")
    parser.add_argument("--check", action="store_true", help="exit 1 if any message was lost")
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.client_processes, args.burst_processes = 40, 2, 2
        args.latency_seconds = 2
        args.layers = args.layers or ["project"]
    os.chdir(PROJECT_DIR)
    if args.mode == "fanout":
        for rate in args.latency_rate:
            latency_processes(rate, args.latency_seconds, args.servers)  # refuse it now
        return fanout(args)
    from bench import extra

    return getattr(extra, args.mode)(args)


if __name__ == "__main__":
    sys.exit(main())
