"""Demo workflows, used by the README, the dashboard and the tests.

- ``quick_steps``: a few instant steps to completion.
- ``long_running``: steps that each take ``step_delay`` seconds, to watch updates arrive.
- ``confirm_input``: suspends for a user's approval, completes after resume.
- ``flaky_retry``: its API call fails on the first attempt and succeeds when resumed.
"""

from __future__ import annotations

import time

from pydantic import Field

from processes.models import Assignee
from processes.workflow import Form, Target, Workflow, done, inputstep, register, step


class QuickForm(Form):
    name: str = Field(default="demo", min_length=1, max_length=100)


@step("Prepare")
def prepare(name: str) -> dict:
    return {"greeting": f"hello {name}"}


@step("Compute")
def compute(greeting: str) -> dict:
    return {"length": len(greeting)}


@step("Verify")
def verify(length: int) -> dict:
    return {"verified": length > 0}


quick_steps = register(
    Workflow(
        key="quick_steps",
        description="Runs a few quick steps to completion",
        target=Target.CREATE,
        initial_form=QuickForm,
        steps=(prepare, compute, verify, done),
    )
)


class LongRunningForm(Form):
    step_delay: float = Field(default=1.0, ge=0, le=60, description="Seconds each step takes")


def _slow_step(index: int):
    @step(f"Slow step {index}")
    def slow(step_delay: float) -> dict:
        time.sleep(step_delay)
        return {f"slow_step_{index}": "done"}

    return slow


long_running = register(
    Workflow(
        key="long_running",
        description="Steps that each take step_delay seconds, to watch live updates",
        target=Target.SYSTEM,
        is_task=True,
        initial_form=LongRunningForm,
        steps=(*(_slow_step(i) for i in range(1, 6)), done),
    )
)


class ConfirmForm(Form):
    approved: bool
    comment: str = Field(default="", max_length=1000)


@step("Plan change")
def plan_change() -> dict:
    return {"plan": "replace line card"}


@step("Apply change")
def apply_change(approved: bool, plan: str) -> dict:
    return {"applied": plan if approved else None}


confirm_input = register(
    Workflow(
        key="confirm_input",
        description="Suspends until a user approves, then completes",
        target=Target.MODIFY,
        steps=(
            plan_change,
            inputstep("Confirm change", ConfirmForm, assignee=Assignee.CHANGES),
            apply_change,
            done,
        ),
    )
)


class FlakyApiError(RuntimeError):
    pass


@step("Prepare request")
def prepare_request() -> dict:
    return {"request": "decommission"}


@step("Call flaky API")
def call_flaky_api(attempt: int) -> dict:
    if attempt == 1:
        raise FlakyApiError("the inventory API timed out (first attempt always fails)")
    return {"api_attempts": attempt}


flaky_retry = register(
    Workflow(
        key="flaky_retry",
        description="Fails in a step on the first attempt and succeeds when resumed",
        target=Target.TERMINATE,
        steps=(prepare_request, call_flaky_api, done),
    )
)
