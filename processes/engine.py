"""The workflow engine: executes claimed processes step by step on a pool of worker threads.

A process is executed by exactly one *run* at a time. A run owns the process through its claim
token (``Process.run_claim``, taken with a conditional UPDATE by the services); every step it
logs is committed together with the process update in one transaction that only succeeds while
the claim still holds and the process is still running. An abort or delete from elsewhere
therefore wins cleanly: the run notices at its next commit and stops.

Between steps (the *step boundary*) a run checks the engine lock and the pool's stop flag. When
either is set the run stops, leaving the process ``running`` with no claim, so unlocking the
engine (or restarting the server) resumes it from the next step.

After each committed change the run calls the ``broadcast`` function it was given. Broadcasting
is never allowed to fail or slow a step: its errors are logged and swallowed.
"""

from __future__ import annotations

import logging
import threading
import traceback as tb
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

from django.conf import settings
from django.db import close_old_connections, connection, transaction
from django.db.models import QuerySet
from django.utils import timezone

from engine_status import services as engine_lock
from engine_status.selectors import is_locked
from processes.models import (
    EXECUTABLE_STATUSES,
    FAILED_STATUSES,
    Process,
    ProcessStatus,
    ProcessStep,
    StepStatus,
)
from processes.workflow import ApiUnavailable, InconsistentData, Step, StepWaiting, registry

logger = logging.getLogger(__name__)

SYSTEM_USER = "SYSTEM"


class BroadcastFunc(Protocol):
    """Called after every committed change of a process (see process_data_broadcast)."""

    def __call__(
        self,
        process_id: uuid.UUID,
        *,
        status: str | None = None,
        step_id: uuid.UUID | None = None,
        status_counts_changed: bool = False,
        deleted: bool = False,
    ) -> None: ...


def no_broadcast(process_id: uuid.UUID, **details: Any) -> None:
    """The broadcast function used where nobody listens (management commands, some tests)."""


def notify(broadcast: BroadcastFunc, process_id: uuid.UUID, **details: Any) -> None:
    """Call ``broadcast``; a broadcaster failure is logged and never reaches the caller."""
    try:
        broadcast(process_id, **details)
    except Exception:
        logger.exception("broadcast of process %s failed; the process is not affected", process_id)


def new_claim() -> str:
    return uuid.uuid4().hex


def record_step(
    process: Process,
    step_name: str,
    status: StepStatus,
    *,
    state_delta: dict[str, Any],
    created_by: str,
    **process_fields: Any,
) -> ProcessStep:
    """Log a step and apply its effect on the process, in the caller's transaction.

    ``process.state`` is merged with ``state_delta``; ``process_fields`` are set on the process
    as well. The caller decides how the process row is written (see :func:`_commit_step`).
    """
    process.state = {**process.state, **state_delta}
    process.last_step = step_name
    process.last_modified_at = timezone.now()
    for name, value in process_fields.items():
        setattr(process, name, value)
    return ProcessStep.objects.create(
        process=process,
        name=step_name,
        status=status,
        state=process.state,
        state_delta=state_delta,
        created_by=created_by,
        executed_at=process.last_modified_at,
    )


class _RunPreempted(Exception):
    """The process was aborted, deleted or re-claimed while a step ran."""


_PROCESS_ROW_FIELDS = (
    "state",
    "last_step",
    "last_modified_at",
    "last_status",
    "next_step_index",
    "assignee",
    "failed_reason",
    "traceback",
)


def _commit_step(
    process: Process, claim: str, step_name: str, status: StepStatus, **kwargs: Any
) -> ProcessStep:
    """Record a step of a run; raises _RunPreempted when the run no longer owns the process."""
    with transaction.atomic():
        logged = record_step(process, step_name, status, **kwargs)
        values = {name: getattr(process, name) for name in _PROCESS_ROW_FIELDS}
        if process.last_status != ProcessStatus.RUNNING:
            # The step that stops the run hands the process back in the same commit: whoever
            # sees it suspended or failed can resume it at once.
            values["run_claim"] = None
        owned = Process.objects.filter(
            pk=process.pk, run_claim=claim, last_status=ProcessStatus.RUNNING
        ).update(**values)
        if not owned:
            raise _RunPreempted
    return logged


def _lend_pooled_connection() -> None:
    """A step's function may take minutes (an API call, a wait); meanwhile its worker's database
    connection serves other threads. Only a pooled one: reopening SQLite's would only cost."""
    if connection.settings_dict.get("OPTIONS", {}).get("pool"):
        connection.close()


class WorkerPool:
    """Executes processes on ``MAX_WORKERS`` threads; one per server process."""

    def __init__(self, max_workers: int):
        self._executor = ThreadPoolExecutor(max_workers, thread_name_prefix="process-worker")
        self._stopping = threading.Event()

    def submit(
        self,
        process_id: uuid.UUID,
        claim: str,
        broadcast: BroadcastFunc,
        user_input: dict[str, Any] | None = None,
    ) -> Future:
        """Run a process the caller has claimed; ``user_input`` answers a suspended input step."""
        return self._executor.submit(self._run, process_id, claim, broadcast, user_input)

    def shutdown(self) -> None:
        """Stop every run at its next step boundary and wait for the threads to finish.

        Runs still queued start, see the stop flag and release their claim at once, so every
        process is left resumable.
        """
        self._stopping.set()
        self._executor.shutdown(wait=True)

    def _run(self, process_id, claim, broadcast, user_input) -> None:
        started = False
        try:
            if self._stopping.is_set():
                return
            engine_lock.run_started()
            started = True
            _Run(process_id, claim, broadcast, self._stopping).execute(user_input)
        except Exception:
            logger.exception("run of process %s crashed", process_id)
        finally:
            try:
                Process.objects.filter(pk=process_id, run_claim=claim).update(run_claim=None)
                if started:
                    engine_lock.run_finished()
            except Exception:
                logger.exception("releasing process %s failed", process_id)
            # Worker threads outlive processes; give the connection back between runs.
            connection.close()


class _Run:
    """One worker's execution of one process, from its claim to a stop."""

    def __init__(self, process_id, claim: str, broadcast: BroadcastFunc, stopping: threading.Event):
        self.process_id = process_id
        self.claim = claim
        self.broadcast = broadcast
        self.stopping = stopping

    def execute(self, user_input: dict[str, Any] | None) -> None:
        close_old_connections()
        # A run may start long after its claim was taken (the pool was full): what was aborted
        # meanwhile keeps the claim until here, but is not the run's to execute any more.
        process = Process.objects.filter(
            pk=self.process_id, run_claim=self.claim, last_status__in=EXECUTABLE_STATUSES
        ).first()
        if process is None:
            return
        # Both updates below are conditional on the status just read: an abort committed in
        # between wins, rather than being overwritten.
        unchanged = Process.objects.filter(
            pk=process.pk, run_claim=self.claim, last_status=process.last_status
        )
        workflow = registry.get(process.workflow_name)
        if workflow is None:
            self._fail_unknown_workflow(process, unchanged)
            return
        if process.last_status != ProcessStatus.RUNNING:
            process.last_status = ProcessStatus.RUNNING
            process.last_modified_at = timezone.now()
            started = unchanged.update(
                last_status=process.last_status, last_modified_at=process.last_modified_at
            )
            if not started:
                logger.info("process %s was aborted or deleted before its run began", process.pk)
                return
            notify(self.broadcast, process.pk, status=process.last_status)
        try:
            while not self.stopping.is_set() and not is_locked():
                step = workflow.steps[process.next_step_index]
                logged = self._execute_step(process, step, user_input)
                user_input = None
                notify(
                    self.broadcast,
                    process.pk,
                    status=process.last_status,
                    step_id=logged.step_id,
                    status_counts_changed=process.last_status in FAILED_STATUSES,
                )
                if process.last_status != ProcessStatus.RUNNING:
                    return
        except _RunPreempted:
            logger.info("process %s changed under its run (aborted or deleted); run stopped", process.pk)

    def _execute_step(self, process: Process, step: Step, user_input: dict[str, Any] | None) -> ProcessStep:
        advance = {"next_step_index": process.next_step_index + 1}
        if step.is_done:
            return _commit_step(
                process,
                self.claim,
                step.name,
                StepStatus.COMPLETE,
                state_delta={},
                created_by=SYSTEM_USER,
                last_status=ProcessStatus.COMPLETED,
                **advance,
            )
        if step.is_input:
            if user_input is None:
                return _commit_step(
                    process,
                    self.claim,
                    step.name,
                    StepStatus.SUSPEND,
                    state_delta={},
                    created_by=SYSTEM_USER,
                    last_status=ProcessStatus.SUSPENDED,
                    assignee=step.assignee,
                )
            return _commit_step(
                process,
                self.claim,
                step.name,
                StepStatus.SUCCESS,
                state_delta=user_input,
                created_by=process.created_by,
                **advance,
            )
        attempt = 1
        if step.wants_attempt:
            attempt += ProcessStep.objects.filter(
                process=process, name=step.name, status__in=[StepStatus.FAILED, StepStatus.WAITING]
            ).count()
        _lend_pooled_connection()
        try:
            delta = step.run(process.state, attempt)
        except StepWaiting as exc:
            return self._commit_failure(process, step, exc, ProcessStatus.WAITING, StepStatus.WAITING)
        except ApiUnavailable as exc:
            return self._commit_failure(process, step, exc, ProcessStatus.API_UNAVAILABLE)
        except InconsistentData as exc:
            return self._commit_failure(process, step, exc, ProcessStatus.INCONSISTENT_DATA)
        except Exception as exc:
            return self._commit_failure(process, step, exc, ProcessStatus.FAILED)
        return _commit_step(
            process,
            self.claim,
            step.name,
            StepStatus.SUCCESS,
            state_delta=delta,
            created_by=SYSTEM_USER,
            failed_reason="",
            traceback="",
            **advance,
        )

    def _commit_failure(
        self,
        process: Process,
        step: Step,
        exc: BaseException,
        process_status: ProcessStatus,
        step_status: StepStatus = StepStatus.FAILED,
    ) -> ProcessStep:
        return _commit_step(
            process,
            self.claim,
            step.name,
            step_status,
            state_delta={},
            created_by=SYSTEM_USER,
            last_status=process_status,
            failed_reason=f"{type(exc).__name__}: {exc}",
            traceback="".join(tb.format_exception(exc)),
        )

    def _fail_unknown_workflow(self, process: Process, unchanged: QuerySet[Process]) -> None:
        reason = f"workflow {process.workflow_name!r} is not registered on this server"
        failed = unchanged.update(
            last_status=ProcessStatus.FAILED,
            failed_reason=reason,
            last_modified_at=timezone.now(),
            run_claim=None,
        )
        if failed:
            notify(self.broadcast, process.pk, status=ProcessStatus.FAILED, status_counts_changed=True)


_pool: WorkerPool | None = None
_pool_lock = threading.Lock()


def get_worker_pool() -> WorkerPool:
    """This server process's pool, created on first use with ``settings.MAX_WORKERS`` threads."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = WorkerPool(settings.MAX_WORKERS)
        return _pool


def shutdown_worker_pool() -> None:
    """Stop the pool at the next step boundaries (server shutdown, tests)."""
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.shutdown()
