"""The workflow engine and the engine lock, exercised on the real worker pool."""

from __future__ import annotations

import json
import threading
import time

import pytest
from django.db import connection, transaction

from engine_status import services as engine_lock
from engine_status.models import EngineSettings
from engine_status.selectors import EngineStatus, get_engine_status, is_locked
from processes import services
from processes.engine import _commit_step, no_broadcast
from processes.models import Process, ProcessStatus, ProcessStep, StepStatus
from processes.workflow import (
    ApiUnavailable,
    InconsistentData,
    Step,
    StepWaiting,
    Workflow,
    done,
    register,
    registry,
    step,
)
from tests.helpers import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def status_of(process_id) -> str:
    return Process.objects.get(pk=process_id).last_status


def wait_for_status(process_id, status, timeout=10):
    wait_until(lambda: status_of(process_id) == status, timeout=timeout, what=f"status {status}")


def put_lock(api_client, locked: bool):
    response = api_client.put(
        "/api/settings/status", data=json.dumps({"global_lock": locked}), content_type="application/json"
    )
    assert response.status_code == 200, response.content
    return response.json()


def _register_once(workflow: Workflow) -> Workflow:
    return registry.get(workflow.key) or register(workflow)


def _raise(exc_class):
    def fail() -> dict:
        raise exc_class("external system says no")

    return fail


@pytest.mark.parametrize(
    "exc_class, process_status, step_status",
    [
        (StepWaiting, "waiting", "waiting"),
        (ApiUnavailable, "api_unavailable", "failed"),
        (InconsistentData, "inconsistent_data", "failed"),
        (ZeroDivisionError, "failed", "failed"),
    ],
)
def test_step_exceptions_map_to_statuses_and_are_resumable(exc_class, process_status, step_status):
    flaky = step("Flaky")(_raise(exc_class))
    workflow = _register_once(
        Workflow(key=f"test_{exc_class.__name__}", description="test", steps=(flaky, done))
    )
    process_id = services.start_process(workflow.key, [], created_by="t", broadcast=no_broadcast)
    wait_for_status(process_id, process_status)
    process = Process.objects.get(pk=process_id)
    assert process.failed_reason == f"{exc_class.__name__}: external system says no"
    assert process.steps.last().status == step_status
    # Resumable: it is retried (and fails again the same way).
    services.resume_process(process_id, [], resumed_by="t", broadcast=no_broadcast)
    wait_until(lambda: process.steps.filter(name="Flaky").count() == 2, what="retry")
    wait_for_status(process_id, process_status)


def test_step_function_may_take_the_whole_state():
    @step("Count keys")
    def count_keys(state: dict) -> dict:
        return {"keys": sorted(state)}

    workflow = _register_once(Workflow(key="test_whole_state", description="t", steps=(count_keys, done)))
    process_id = services.start_process(workflow.key, [{"a": 1}], created_by="t", broadcast=no_broadcast)
    wait_for_status(process_id, "completed")
    assert Process.objects.get(pk=process_id).state == {"a": 1, "keys": ["a"]}


def test_step_returning_a_non_dict_fails_the_process_clearly():
    bad = step("Bad return")(lambda: [1, 2])
    workflow = _register_once(Workflow(key="test_bad_return", description="t", steps=(bad, done)))
    process_id = services.start_process(workflow.key, [], created_by="t", broadcast=no_broadcast)
    wait_for_status(process_id, "failed")
    assert "returned list, expected a dict" in Process.objects.get(pk=process_id).failed_reason


def test_workflow_must_end_with_done():
    with pytest.raises(ValueError, match="must end with the done step"):
        Workflow(key="broken", description="t", steps=(step("A")(lambda: {}),))


def test_broadcast_called_after_every_committed_step():
    calls = []
    lock = threading.Lock()

    def record(process_id, **details):
        # Each call comes after the commit: the step it names is already readable.
        with lock:
            step_id = details.get("step_id")
            calls.append((details.get("status"), step_id and ProcessStep.objects.get(step_id=step_id).name))

    process_id = services.start_process("quick_steps", [], created_by="t", broadcast=record)
    wait_for_status(process_id, "completed")
    wait_until(lambda: len(calls) == 6)
    assert calls == [
        ("created", "Start"),
        ("running", None),
        ("running", "Prepare"),
        ("running", "Compute"),
        ("running", "Verify"),
        ("completed", "Done"),
    ]


@pytest.mark.parametrize(
    "workflow, stopped_status", [("flaky_retry", "failed"), ("confirm_input", "suspended")]
)
def test_a_stopped_process_is_resumable_when_its_stop_is_announced(workflow, stopped_status):
    """The step that stops a run releases the run's claim in its own commit: a user who resumes
    the moment the page shows the process stopped gets no 409."""
    claims_when_announced = []

    def record(process_id, **details):
        if details.get("status") == stopped_status:
            claims_when_announced.append(Process.objects.get(pk=process_id).run_claim)

    services.start_process(workflow, [], created_by="t", broadcast=record)
    wait_until(lambda: claims_when_announced, what=f"the {stopped_status} announcement")
    assert claims_when_announced == [None]


def test_failing_broadcast_never_fails_or_slows_a_step(caplog):
    def broken(process_id, **details):
        raise ConnectionError("broadcaster is down")

    began = time.monotonic()
    process_id = services.start_process("quick_steps", [], created_by="t", broadcast=broken)
    wait_for_status(process_id, "completed")
    assert time.monotonic() - began < 5
    assert Process.objects.get(pk=process_id).steps.count() == 5
    assert "broadcaster is down" in caplog.text


def test_lock_pauses_at_step_boundary_then_unlock_resumes(api_client):
    process_id = services.start_process(
        "long_running", [{"step_delay": 0.4}], created_by="t", broadcast=no_broadcast
    )
    wait_until(lambda: ProcessStep.objects.filter(process_id=process_id, name="Slow step 1").exists())

    status = put_lock(api_client, True)
    assert status == {"global_lock": True, "running_processes": 1, "global_status": "PAUSING"}
    wait_until(lambda: get_engine_status().running_processes == 0, what="run to stop at a boundary")
    assert api_client.get("/api/settings/status").json()["global_status"] == "PAUSED"
    assert status_of(process_id) == "running"  # paused runs keep their status
    logged = Process.objects.get(pk=process_id).steps.count()
    time.sleep(0.6)
    assert Process.objects.get(pk=process_id).steps.count() == logged  # really paused

    refused = api_client.post("/api/processes/quick_steps", data="[]", content_type="application/json")
    assert refused.status_code == 503
    assert "locked" in refused.json()["detail"]

    status = put_lock(api_client, False)
    assert status["global_status"] == "RUNNING"
    wait_for_status(process_id, "completed")
    names = [s.name for s in Process.objects.get(pk=process_id).steps.all()]
    assert names == ["Start", *(f"Slow step {i}" for i in range(1, 6)), "Done"]


def test_resume_refused_while_locked(api_client):
    process_id = services.start_process("confirm_input", [], created_by="t", broadcast=no_broadcast)
    wait_for_status(process_id, "suspended")
    put_lock(api_client, True)
    response = api_client.put(
        f"/api/processes/{process_id}/resume",
        data=json.dumps([{"approved": True}]),
        content_type="application/json",
    )
    assert response.status_code == 503
    assert status_of(process_id) == "suspended"
    put_lock(api_client, False)
    assert status_of(process_id) == "suspended"  # unlock resumes paused runs, not suspended ones


def test_the_lock_is_read_from_its_row_which_is_created_when_missing(api_client):
    EngineSettings.objects.all().delete()
    assert is_locked() is False
    assert EngineSettings.objects.filter(pk=EngineSettings.SINGLETON_PK).exists()
    put_lock(api_client, True)
    assert is_locked() is True
    put_lock(api_client, False)
    assert is_locked() is False


def test_the_engine_status_is_read_from_its_row_which_is_created_when_missing():
    EngineSettings.objects.all().delete()
    assert get_engine_status() == EngineStatus(global_lock=False, running_processes=0)
    row = EngineSettings.objects.filter(pk=EngineSettings.SINGLETON_PK)
    assert row.exists()
    row.update(global_lock=True, running_processes=3)
    assert get_engine_status() == EngineStatus(global_lock=True, running_processes=3)


@pytest.mark.parametrize("body", ['{"global_lock": "yes"}', "{}", '{"global_lock": true, "x": 1}', "nope"])
def test_engine_settings_reject_bad_bodies(api_client, body):
    response = api_client.put("/api/settings/status", data=body, content_type="application/json")
    assert response.status_code == 400
    assert get_engine_status().global_lock is False


def test_many_processes_share_the_worker_pool(settings):
    assert settings.MAX_WORKERS == 5
    seen_running = []
    ids = [
        services.start_process("long_running", [{"step_delay": 0.2}], created_by="t", broadcast=no_broadcast)
        for _ in range(12)
    ]

    def all_done():
        seen_running.append(get_engine_status().running_processes)
        return Process.objects.filter(pk__in=ids, last_status=ProcessStatus.COMPLETED).count() == 12

    wait_until(all_done, timeout=30, interval=0.01)
    assert max(seen_running) == 5  # the pool was full, never over
    # A run's count drops just after its last step commits.
    wait_until(lambda: get_engine_status().running_processes == 0, what="every run to end")
    for process_id in ids:
        assert [s.name for s in Process.objects.get(pk=process_id).steps.all()][-1] == "Done"
        assert Process.objects.get(pk=process_id).run_claim is None


def test_a_process_aborted_while_its_run_waits_for_a_worker_stays_aborted(settings):
    """The run of a process started on a full pool begins later, still holding its claim; by
    then the process may be aborted, and the run must not bring it back to running."""
    busy = [
        services.start_process("long_running", [{"step_delay": 0.3}], created_by="t", broadcast=no_broadcast)
        for _ in range(settings.MAX_WORKERS)
    ]
    queued = services.start_process("quick_steps", [], created_by="t", broadcast=no_broadcast)
    services.abort_process(queued, aborted_by="t", broadcast=no_broadcast)
    # No worker has come free yet (each busy run takes 1.5 s): the queued run has not begun.
    assert not Process.objects.filter(pk__in=busy, last_status=ProcessStatus.COMPLETED).exists()

    wait_until(lambda: Process.objects.get(pk=queued).run_claim is None, what="the queued run to let go")
    process = Process.objects.get(pk=queued)
    assert process.last_status == "aborted"
    assert [s.name for s in process.steps.order_by("executed_at")] == ["Start", "Abort"]


def test_a_delete_takes_the_step_a_run_is_committing_with_it():
    """A run commits a step while the process is being deleted: the delete waits for that
    commit and removes its step too (on PostgreSQL a step committed in between used to fail
    the delete's commit on the foreign key)."""
    process = Process.objects.create(
        workflow_name="quick_steps", last_status=ProcessStatus.RUNNING, run_claim="c"
    )
    holding = threading.Event()
    committed = []

    def commit_a_step_slowly():
        try:
            with transaction.atomic():  # _commit_step's own transaction nests in this one
                step = _commit_step(
                    process, "c", "Prepare", StepStatus.SUCCESS, state_delta={}, created_by="t"
                )
                holding.set()
                time.sleep(0.5)  # the commit is in flight: the row stays locked
            committed.append(step.step_id)
        finally:
            holding.set()
            connection.close()

    run = threading.Thread(target=commit_a_step_slowly)
    run.start()
    assert holding.wait(5)
    services.delete_process(process.pk, broadcast=no_broadcast)
    run.join()
    assert len(committed) == 1  # the step was committed before the delete went through
    assert not Process.objects.filter(pk=process.pk).exists()
    assert not ProcessStep.objects.filter(process_id=process.pk).exists()


def test_engine_lock_counts_are_atomic_under_contention():
    def churn():
        try:
            for _ in range(25):
                engine_lock.run_started()
                engine_lock.run_finished()
        finally:
            connection.close()

    threads = [threading.Thread(target=churn) for _ in range(4)]
    engine_lock.run_started()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert get_engine_status().running_processes == 1
    engine_lock.run_finished()


def test_a_step_function_gets_what_its_parameters_ask_for():
    whole = Step("whole", func=lambda state: {"keys": sorted(state)})
    named = Step("named", func=lambda plan, attempt: {"seen": [plan, attempt]})
    everything = Step("everything", func=lambda **given: {"seen": sorted(given)})
    plain = Step("plain", func=lambda plan: {"seen": plan})
    state = {"plan": "p", "other": 1}
    assert whole.run(state, 1) == {"keys": ["other", "plan"]}
    assert named.run(state, 3) == {"seen": ["p", 3]}
    assert everything.run(state, 2) == {"seen": ["attempt", "other", "plan"]}
    assert plain.run(state, 2) == {"seen": "p"}
    assert [s.wants_attempt for s in (whole, named, everything, plain)] == [False, True, True, False]
    # Asked again (the parameters are looked up once): the same answers.
    assert named.run(state, 4) == {"seen": ["p", 4]} and named.wants_attempt
