"""Processes (running workflows) and the steps they logged, with the orchestrator's status values."""

from __future__ import annotations

import uuid

from django.db import models
from django.utils import timezone


class ProcessStatus(models.TextChoices):
    CREATED = "created"
    RUNNING = "running"
    SUSPENDED = "suspended"
    WAITING = "waiting"
    ABORTED = "aborted"
    FAILED = "failed"
    API_UNAVAILABLE = "api_unavailable"
    INCONSISTENT_DATA = "inconsistent_data"
    COMPLETED = "completed"
    RESUMED = "resumed"


# Statuses in which a process may still change by itself or be watched live (orchestrator-core's
# definition); a detail stream closes once its process leaves them.
ACTIVE_STATUSES = frozenset(
    {
        ProcessStatus.CREATED,
        ProcessStatus.RUNNING,
        ProcessStatus.SUSPENDED,
        ProcessStatus.WAITING,
        ProcessStatus.RESUMED,
    }
)
# A failure a user can repair by resuming the process.
FAILED_STATUSES = frozenset(
    {ProcessStatus.FAILED, ProcessStatus.API_UNAVAILABLE, ProcessStatus.INCONSISTENT_DATA}
)
RESUMABLE_STATUSES = FAILED_STATUSES | {ProcessStatus.SUSPENDED, ProcessStatus.WAITING}
TERMINAL_STATUSES = frozenset({ProcessStatus.COMPLETED, ProcessStatus.ABORTED})
# Statuses a worker moves on by itself; with no worker holding a claim they are stalled
# (engine locked, server stopped), and unlocking the engine resumes them.
EXECUTABLE_STATUSES = frozenset({ProcessStatus.CREATED, ProcessStatus.RUNNING, ProcessStatus.RESUMED})


class StepStatus(models.TextChoices):
    SUCCESS = "success"
    SKIPPED = "skipped"
    SUSPEND = "suspend"
    WAITING = "waiting"
    FAILED = "failed"
    ABORT = "abort"
    COMPLETE = "complete"


# Reported for workflow steps that have not run yet; never stored.
PENDING = "pending"


class Assignee(models.TextChoices):
    SYSTEM = "SYSTEM"
    NOC = "NOC"
    CHANGES = "CHANGES"
    KLANTSUPPORT = "KLANTSUPPORT"


class Process(models.Model):
    process_id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    workflow_name = models.CharField(max_length=255, db_index=True)
    last_status = models.CharField(
        max_length=32, choices=ProcessStatus.choices, default=ProcessStatus.CREATED, db_index=True
    )
    last_step = models.CharField(max_length=255, blank=True, default="")
    assignee = models.CharField(max_length=32, choices=Assignee.choices, default=Assignee.SYSTEM)
    failed_reason = models.TextField(blank=True, default="")
    traceback = models.TextField(blank=True, default="")
    created_by = models.CharField(max_length=255, blank=True, default="")
    started_at = models.DateTimeField(default=timezone.now, db_index=True)
    last_modified_at = models.DateTimeField(default=timezone.now)
    is_task = models.BooleanField(default=False)
    # The state the next step receives: the merge of everything logged so far.
    state = models.JSONField(default=dict, blank=True)
    # Index into the workflow's steps of the next step to execute.
    next_step_index = models.PositiveIntegerField(default=0)
    # Token of the worker run that owns this process; NULL when no worker is executing it.
    # Claimed with a conditional UPDATE, so two workers (or two server processes) can never
    # execute the same process at once.
    run_claim = models.CharField(max_length=64, null=True, blank=True, db_index=True)

    class Meta:
        ordering = ["-started_at"]

    def __str__(self) -> str:
        return f"{self.workflow_name} {self.process_id} ({self.last_status})"


class ProcessStep(models.Model):
    step_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    process = models.ForeignKey(Process, related_name="steps", on_delete=models.CASCADE)
    name = models.CharField(max_length=255)
    status = models.CharField(max_length=32, choices=StepStatus.choices)
    # The full state after this step, and what this step changed.
    state = models.JSONField(default=dict, blank=True)
    state_delta = models.JSONField(default=dict, blank=True)
    created_by = models.CharField(max_length=255, blank=True, default="")
    executed_at = models.DateTimeField(default=timezone.now)

    class Meta:
        # The auto-increment id is the order steps were logged in.
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.name} ({self.status})"
