"""What users do to processes: start, resume, abort, delete; and resuming stalled ones.

Views and the unlock handler call these; they validate, record the change, claim the process
for a worker run where one is needed and tell ``broadcast`` what changed. Errors are the
exceptions below and ``FormInputError``, which the API maps to HTTP status codes.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from engine_status.selectors import is_locked
from processes.engine import BroadcastFunc, get_worker_pool, new_claim, notify, record_step
from processes.models import (
    EXECUTABLE_STATUSES,
    RESUMABLE_STATUSES,
    TERMINAL_STATUSES,
    Process,
    ProcessStatus,
    StepStatus,
)
from processes.workflow import registry, validate_form

logger = logging.getLogger(__name__)


class ProcessError(Exception):
    """Base of the errors a user's request can cause; ``str()`` is the message for the user."""


class UnknownWorkflow(ProcessError):
    pass


class ProcessNotFound(ProcessError):
    pass


class ProcessConflict(ProcessError):
    """The process is in a status that does not allow the request."""


class EngineLocked(ProcessError):
    pass


UserInputs = list[dict[str, Any]]


def _refuse_when_locked(action: str) -> None:
    if is_locked():
        raise EngineLocked(f"the engine is locked (paused): cannot {action}; unlock it first")


def existing_process(process_id: uuid.UUID) -> Process:
    """The process, or ProcessNotFound (which the API answers with a 404)."""
    process = Process.objects.filter(pk=process_id).first()
    if process is None:
        raise ProcessNotFound(f"process {process_id} not found")
    return process


def start_process(
    workflow_key: str, user_inputs: UserInputs, *, created_by: str, broadcast: BroadcastFunc
) -> uuid.UUID:
    """Create a process of ``workflow_key`` with its validated initial input and run it."""
    workflow = registry.get(workflow_key)
    if workflow is None:
        raise UnknownWorkflow(f"workflow {workflow_key!r} not found")
    _refuse_when_locked("start a process")
    initial_state = validate_form(workflow.initial_form, user_inputs)
    claim = new_claim()
    with transaction.atomic():
        process = Process.objects.create(
            workflow_name=workflow.key,
            is_task=workflow.is_task,
            created_by=created_by,
            run_claim=claim,
        )
        start = record_step(
            process, "Start", StepStatus.SUCCESS, state_delta=initial_state, created_by=created_by
        )
        process.save()
    notify(broadcast, process.pk, status=process.last_status, step_id=start.step_id)
    get_worker_pool().submit(process.pk, claim, broadcast)
    return process.pk


def resume_process(
    process_id: uuid.UUID, user_inputs: UserInputs, *, resumed_by: str, broadcast: BroadcastFunc
) -> None:
    """Continue a suspended, waiting or failed process from the step where it stopped.

    A suspended process's input must satisfy its input step's form and is logged with that
    step; for a failed one, the input (if any) is merged into the state the step is retried with.
    """
    process = existing_process(process_id)
    if process.last_status not in RESUMABLE_STATUSES:
        raise ProcessConflict(f"process {process_id} is {process.last_status} and cannot be resumed")
    _refuse_when_locked("resume a process")
    workflow = registry.get(process.workflow_name)
    if workflow is None:
        raise ProcessConflict(f"workflow {process.workflow_name!r} is not registered on this server")
    pending_step = workflow.steps[process.next_step_index]
    user_input = None
    state_update: dict[str, Any] = {}
    if process.last_status == ProcessStatus.SUSPENDED and pending_step.is_input:
        user_input = validate_form(pending_step.form, user_inputs)
    else:
        state_update = validate_form(None, user_inputs)
    claim = new_claim()
    claimed = Process.objects.filter(
        pk=process_id, last_status=process.last_status, run_claim__isnull=True
    ).update(
        last_status=ProcessStatus.RESUMED,
        run_claim=claim,
        state={**process.state, **state_update},
        last_modified_at=timezone.now(),
    )
    if not claimed:
        raise ProcessConflict(f"process {process_id} changed while resuming it; reload and retry")
    logger.info("process %s resumed by %s", process_id, resumed_by)
    notify(broadcast, process_id, status=ProcessStatus.RESUMED, status_counts_changed=True)
    get_worker_pool().submit(process_id, claim, broadcast, user_input)


def abort_process(process_id: uuid.UUID, *, aborted_by: str, broadcast: BroadcastFunc) -> None:
    """Abort a process that has not ended; a run executing it stops at its next commit."""
    with transaction.atomic():
        process = Process.objects.select_for_update().filter(pk=process_id).first()
        if process is None:
            raise ProcessNotFound(f"process {process_id} not found")
        if process.last_status in TERMINAL_STATUSES:
            raise ProcessConflict(f"process {process_id} is already {process.last_status}")
        abort = record_step(
            process,
            "Abort",
            StepStatus.ABORT,
            state_delta={},
            created_by=aborted_by,
            last_status=ProcessStatus.ABORTED,
        )
        process.save()
    notify(
        broadcast,
        process_id,
        status=ProcessStatus.ABORTED,
        step_id=abort.step_id,
        status_counts_changed=True,
    )


def delete_process(process_id: uuid.UUID, *, broadcast: BroadcastFunc) -> None:
    """Delete a process and its steps; a run executing it stops at its next commit.

    The process row is locked first. A run's step commit holds that lock from its update of the
    row to its commit, so the steps deleted next include any step committed just before; without
    it, such a step would outlive the delete's own step query and fail its commit (PostgreSQL).
    """
    with transaction.atomic():
        process = Process.objects.select_for_update().filter(pk=process_id).first()
        if process is None:
            raise ProcessNotFound(f"process {process_id} not found")
        process.delete()
    notify(broadcast, process_id, deleted=True, status_counts_changed=True)


def resume_stalled_processes(broadcast: BroadcastFunc) -> list[uuid.UUID]:
    """Give a worker run to every process that should be executing but that no worker holds.

    These are processes a locked engine paused at a step boundary, or a stopped server left
    behind; called when the engine is unlocked and when a server starts.
    """
    if is_locked():
        return []
    resumed = []
    stalled = Process.objects.filter(
        Q(last_status__in=EXECUTABLE_STATUSES) & Q(run_claim__isnull=True)
    ).values_list("pk", flat=True)
    for process_id in stalled:
        claim = new_claim()
        if Process.objects.filter(pk=process_id, run_claim__isnull=True).update(run_claim=claim):
            get_worker_pool().submit(process_id, claim, broadcast)
            resumed.append(process_id)
    if resumed:
        logger.info("resumed %d stalled processes", len(resumed))
    return resumed
