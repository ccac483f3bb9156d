"""Reads of processes, returning the shapes built by processes.messages."""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from django.db.models import QuerySet

from processes import messages
from processes.models import Process, ProcessStatus, ProcessStep
from processes.workflow import Form, registry


def get_process(process_id: uuid.UUID) -> Process | None:
    return Process.objects.filter(pk=process_id).first()


def resume_form(process: Process) -> type[Form] | None:
    """The form a resume must satisfy: a suspended input step's, else none."""
    workflow = registry.get(process.workflow_name)
    if workflow is None or process.last_status != ProcessStatus.SUSPENDED:
        return None
    if process.next_step_index >= len(workflow.steps):
        return None
    return workflow.steps[process.next_step_index].form


def process_detail(process: Process) -> messages.Frame:
    return messages.process_detail(process, list(process.steps.all()))


def get_process_detail(process_id: uuid.UUID) -> messages.Frame | None:
    process = get_process(process_id)
    return process_detail(process) if process is not None else None


def processes(process_ids: Iterable[uuid.UUID]) -> QuerySet[Process]:
    return Process.objects.filter(pk__in=list(process_ids))


def processes_with_steps(
    process_ids: Iterable[uuid.UUID],
) -> dict[uuid.UUID, tuple[Process, list[ProcessStep]]]:
    """Processes with their logged steps in order, in two queries however many they are."""
    process_ids = list(process_ids)
    if not process_ids:
        # The broadcast thread asks for none when no detail page is open, nearly every batch;
        # building the two queries would cost it half a millisecond to learn nothing.
        return {}
    found: dict[uuid.UUID, tuple[Process, list[ProcessStep]]] = {
        process.pk: (process, []) for process in Process.objects.filter(pk__in=process_ids)
    }
    for step in ProcessStep.objects.filter(process_id__in=list(found)).order_by("id"):
        found[step.process_id][1].append(step)
    return found


def list_processes(*, status: str | None = None, workflow: str | None = None) -> QuerySet[Process]:
    """Processes newest first, optionally filtered by last status and workflow key."""
    processes = Process.objects.all()
    if status is not None:
        processes = processes.filter(last_status=status)
    if workflow is not None:
        processes = processes.filter(workflow_name=workflow)
    return processes.order_by("-started_at", "process_id")
