"""CI's smoke run of the fan-out benchmark: small, and no message may be lost (speed is not judged)."""

from __future__ import annotations

import subprocess
import sys

from tests.servers import PROJECT_DIR


def test_benchmark_smoke_run_loses_nothing():
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--check"],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "no message lost" in result.stdout
    row = next(line for line in result.stdout.splitlines() if line.startswith("| project |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert int(cells[0 + 8].replace(",", "")) == 0  # lost
    assert int(cells[9]) == 0  # seq gaps


def test_a_latency_run_gets_a_worker_for_each_of_its_processes():
    from bench.__main__ import SERVER_ENV, WORKERS_PER_SERVER, latency_processes
    from orchestrator_ws.environment import Environment

    assert Environment(MAX_WORKERS=SERVER_ENV["MAX_WORKERS"]).MAX_WORKERS == WORKERS_PER_SERVER
    # 95 messages/s for 25 s: 238 processes of 10 list messages, 119 per server.
    assert latency_processes(95, 25, servers=2) == 238
    assert latency_processes(0.5, 1, servers=2) == 1


def test_a_latency_run_too_long_for_the_workers_is_refused_before_anything_starts():
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--latency-rate", "100", "--latency-seconds", "60"],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "needs 600 processes running at once" in result.stderr
    assert "==" not in result.stdout  # no layer was started
