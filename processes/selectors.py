"""Reads of processes, returning the shapes built by processes.messages."""

from __future__ import annotations

import uuid

from django.db.models import QuerySet

from processes import messages
from processes.models import Process, ProcessStep


def get_process(process_id: uuid.UUID) -> Process | None:
    return Process.objects.filter(pk=process_id).first()


def process_detail(process: Process) -> messages.Frame:
    return messages.process_detail(process, list(process.steps.all()))


def get_process_detail(process_id: uuid.UUID) -> messages.Frame | None:
    process = get_process(process_id)
    return process_detail(process) if process is not None else None


def get_step(step_id: uuid.UUID) -> ProcessStep | None:
    return ProcessStep.objects.filter(step_id=step_id).first()


def list_processes(*, status: str | None = None, workflow: str | None = None) -> QuerySet[Process]:
    """Processes newest first, optionally filtered by last status and workflow key."""
    processes = Process.objects.all()
    if status is not None:
        processes = processes.filter(last_status=status)
    if workflow is not None:
        processes = processes.filter(workflow_name=workflow)
    return processes.order_by("-started_at", "process_id")
