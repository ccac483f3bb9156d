"""Every JSON shape a client sees, built in one place.

The REST views, the websocket consumers and the broadcast thread all build their payloads here,
so the detail a page loads over HTTP and the detail a websocket pushes are the same JSON.
``group_message`` encodes a frame to its compact text once; the layer delivers that text as is.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from engine_status.selectors import EngineStatus
from orchestrator_ws.realtime.protocol import Frame, encode
from processes.models import (
    ACTIVE_STATUSES,
    PENDING,
    TERMINAL_STATUSES,
    Process,
    ProcessStatus,
    ProcessStep,
    StepStatus,
)
from processes.workflow import registry

# The groups the websocket endpoints follow.
PROCESS_LIST_GROUP = "process-list"
ENGINE_STATUS_GROUP = "engine-status"
EVENTS_GROUP = "events"


def process_detail_group(process_id: uuid.UUID | str) -> str:
    return f"process-detail.{process_id}"


# Rows that stand for the current step without finishing it: the step is retried or continued.
_UNFINISHED_STEP_STATUSES = frozenset({StepStatus.SUSPEND, StepStatus.FAILED, StepStatus.WAITING})


def _iso(value) -> str | None:
    return value.isoformat() if value is not None else None


def process_summary(process: Process) -> Frame:
    """A process as the list shows it, with the aliases (id, status, step) older UIs read."""
    workflow = registry.get(process.workflow_name)
    process_id = str(process.process_id)
    return {
        "process_id": process_id,
        "workflow_name": process.workflow_name,
        "workflow_target": workflow.target.value if workflow else None,
        "is_task": process.is_task,
        "last_status": process.last_status,
        "last_step": process.last_step,
        "assignee": process.assignee,
        "failed_reason": process.failed_reason or None,
        "created_by": process.created_by,
        "started_at": _iso(process.started_at),
        "last_modified_at": _iso(process.last_modified_at),
        "id": process_id,
        "status": process.last_status,
        "step": process.last_step,
    }


def process_step(step: ProcessStep) -> Frame:
    return {
        "step_id": str(step.step_id),
        "name": step.name,
        "status": step.status,
        "state": step.state,
        "state_delta": step.state_delta,
        "created_by": step.created_by,
        "executed": _iso(step.executed_at),
    }


def _pending_step_names(process: Process, steps: Sequence[ProcessStep]) -> Sequence[str]:
    workflow = registry.get(process.workflow_name)
    if workflow is None or process.last_status in TERMINAL_STATUSES:
        return ()
    first = process.next_step_index
    current = workflow.step_names[first] if first < len(workflow.step_names) else None
    if steps and steps[-1].name == current and steps[-1].status in _UNFINISHED_STEP_STATUSES:
        first += 1
    return workflow.step_names[first:]


def process_detail(process: Process, steps: Sequence[ProcessStep]) -> Frame:
    """Summary + logged steps, then pending steps, + the current state."""
    return {
        **process_summary(process),
        "steps": [process_step(step) for step in steps]
        + [{"name": name, "status": PENDING} for name in _pending_step_names(process, steps)],
        "current_state": process.state,
    }


def deleted_process(process_id: uuid.UUID) -> Frame:
    process_id = str(process_id)
    return {
        "id": process_id,
        "process_id": process_id,
        "status": ProcessStatus.ABORTED.value,
        "last_status": ProcessStatus.ABORTED.value,
        "deleted": True,
    }


# --- websocket frames -------------------------------------------------------------------------


def process_list_frame(summary: Frame) -> Frame:
    return {"process": summary}


def process_detail_frame(detail: Frame, step: Frame | None = None, status: str | None = None) -> Frame:
    """An update of the detail page; ``close`` tells the client the stream ends here.

    ``status`` is the process status right after the change being announced: a frame is marked
    closing only when *that* change ended the process, even if the detail was read later.
    """
    frame: Frame = {"process": detail}
    if step is not None:
        frame["step"] = step
    if (status or detail.get("last_status")) not in ACTIVE_STATUSES:
        frame["close"] = True
    return frame


def process_detail_update(detail_text: str, step: Frame | None, status: str) -> dict[str, Any]:
    """The group message of ``process_detail_frame(detail, step, status)``, around a detail
    already encoded: the broadcast thread encodes a process's detail once for all the updates
    of it in a batch. Same JSON, key for key (tests/test_messages.py holds them to it)."""
    parts = ['{"process":', detail_text]
    if step is not None:
        parts += [',"step":', encode(step)]
    closing = status not in ACTIVE_STATUSES
    if closing:
        parts.append(',"close":true')
    parts.append("}")
    message: dict[str, Any] = {"type": "group.frame", "text": "".join(parts)}
    if closing:
        message["close"] = True
    return message


def engine_status_frame(status: EngineStatus) -> Frame:
    return {"engine-status": status.as_dict()}


def invalidate_cache_frame(value: Frame) -> Frame:
    return {"name": "invalidateCache", "value": value}


def process_event_frames(process_id: uuid.UUID, *, status_counts_changed: bool) -> list[Frame]:
    """The v2 UI's cache invalidations for a change of one process."""
    frames = [
        invalidate_cache_frame({"type": "processes", "id": "LIST"}),
        invalidate_cache_frame({"type": "processes", "id": str(process_id)}),
    ]
    if status_counts_changed:
        frames.append(invalidate_cache_frame({"type": "processStatusCounts"}))
    return frames


def engine_event_frame() -> Frame:
    return invalidate_cache_frame({"type": "engineStatus"})


def group_message(frame: Frame) -> dict[str, Any]:
    """The channel-layer message carrying ``frame``; ``close`` ends the receiving streams."""
    message: dict[str, Any] = {"type": "group.frame", "text": encode(frame)}
    if frame.get("close"):
        message["close"] = True
    return message


RESYNC_MESSAGE = {"type": "group.resync"}
