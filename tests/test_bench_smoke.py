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
