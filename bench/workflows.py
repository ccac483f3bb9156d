"""The benchmark's workload: a workflow of many quick steps, each one a broadcast.

Registered when ``bench.workflows`` is in WORKFLOW_MODULES (the benchmark sets it).
"""

from __future__ import annotations

import time

from pydantic import Field

from bench import TICKS
from processes.workflow import Form, Target, Workflow, done, register, step


class TicksForm(Form):
    interval: float = Field(default=0.0, ge=0, le=10, description="seconds between ticks")
    start_at: float = Field(default=0.0, ge=0, description="epoch time of the first tick (0: now)")
    last_delay: float = Field(default=0.0, ge=0, le=10, description="extra seconds before the last tick")


def _tick(index: int):
    @step(f"Tick {index}")
    def tick(interval: float, start_at: float, last_delay: float) -> dict:
        # All processes of a burst tick from the same moment, however long starting them took.
        # Done follows the last tick at once, two messages in one slot: last_delay lets the
        # latency run give those pairs slots twice as far apart, keeping its rate even.
        wait = start_at - time.time() if index == 1 else interval + (last_delay if index == TICKS else 0)
        if wait > 0:
            time.sleep(wait)
        return {"ticks": index}

    return tick


bench_ticks = register(
    Workflow(
        key="bench_ticks",
        description=f"{TICKS} steps, `interval` seconds apart (the benchmark's load)",
        target=Target.SYSTEM,
        is_task=True,
        initial_form=TicksForm,
        steps=(*(_tick(i) for i in range(1, TICKS + 1)), done),
    )
)
