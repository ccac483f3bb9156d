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


def _tick(index: int):
    @step(f"Tick {index}")
    def tick(interval: float) -> dict:
        if interval:
            time.sleep(interval)
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
