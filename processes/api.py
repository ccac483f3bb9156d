"""REST endpoints for workflows and processes (orchestrator-core's paths)."""

import uuid
from typing import Any, Literal

from django.http import HttpRequest
from ninja import Body, Query, Router, Schema, Status
from ninja.errors import HttpError
from ninja.pagination import LimitOffsetPagination, paginate
from pydantic import Field

from processes import selectors, services
from processes.messages import process_summary
from processes.models import ProcessStatus, StepStatus
from processes.process_data_broadcast import api_broadcast_process_data
from processes.workflow import registry

router = Router(tags=["processes"])

UserInputs = list[dict[str, Any]]


class WorkflowOut(Schema):
    name: str
    description: str
    target: str
    is_task: bool
    steps: list[str]
    form: dict[str, Any] | None = Field(description="JSON schema of the initial input form")


class ProcessSummaryOut(Schema):
    process_id: uuid.UUID
    workflow_name: str
    workflow_target: str | None
    is_task: bool
    last_status: ProcessStatus
    last_step: str
    assignee: str
    failed_reason: str | None
    created_by: str
    started_at: str
    last_modified_at: str
    id: uuid.UUID
    status: ProcessStatus
    step: str


class LoggedStepOut(Schema):
    step_id: uuid.UUID
    name: str
    status: StepStatus
    state: dict[str, Any]
    state_delta: dict[str, Any]
    created_by: str
    executed: str


class PendingStepOut(Schema):
    name: str
    status: Literal["pending"]


class ProcessDetailOut(ProcessSummaryOut):
    steps: list[LoggedStepOut | PendingStepOut]
    current_state: dict[str, Any]


class ProcessFilters(Schema):
    status: ProcessStatus | None = None
    workflow: str | None = Field(default=None, max_length=255)


class CreatedOut(Schema):
    id: uuid.UUID


def _user(request: HttpRequest) -> str:
    user = getattr(request, "user", None)
    return user.get_username() if user is not None and user.is_authenticated else "anonymous"


@router.get("/workflows/", response=list[WorkflowOut], summary="List the registered workflows")
def list_workflows(request: HttpRequest):
    return [workflow.describe() for workflow in registry]


class _Summaries:
    """A queryset seen as summaries: the paginator slices it, then only that page is built."""

    def __init__(self, processes):
        self._processes = processes

    def __len__(self) -> int:
        return self._processes.count()

    def __getitem__(self, page: slice) -> list[dict[str, Any]]:
        return [process_summary(process) for process in self._processes[page]]


@router.get("/processes/", response=list[ProcessSummaryOut], summary="List processes, newest first")
@paginate(LimitOffsetPagination)
def list_processes(request: HttpRequest, filters: Query[ProcessFilters]):
    return _Summaries(selectors.list_processes(status=filters.status, workflow=filters.workflow))


@router.get(
    "/processes/{uuid:process_id}",
    response=ProcessDetailOut,
    summary="One process with its logged and pending steps",
)
def get_process(request: HttpRequest, process_id: uuid.UUID):
    detail = selectors.get_process_detail(process_id)
    if detail is None:
        raise HttpError(404, f"process {process_id} not found")
    return detail


@router.post(
    "/processes/{workflow_key}",
    response={201: CreatedOut},
    summary="Start a process of a workflow with its initial form input",
)
def start_process(request: HttpRequest, workflow_key: str, user_inputs: UserInputs = Body([])):
    process_id = services.start_process(
        workflow_key,
        user_inputs,
        created_by=_user(request),
        broadcast=api_broadcast_process_data(request),
    )
    return Status(201, {"id": process_id})


@router.put(
    "/processes/{process_id}/resume",
    response={204: None},
    summary="Resume a suspended, waiting or failed process",
)
def resume_process(request: HttpRequest, process_id: uuid.UUID, user_inputs: UserInputs = Body([])):
    services.resume_process(
        process_id,
        user_inputs,
        resumed_by=_user(request),
        broadcast=api_broadcast_process_data(request),
    )
    return Status(204, None)


@router.put("/processes/{process_id}/abort", response={204: None}, summary="Abort a process")
def abort_process(request: HttpRequest, process_id: uuid.UUID):
    services.abort_process(
        process_id, aborted_by=_user(request), broadcast=api_broadcast_process_data(request)
    )
    return Status(204, None)


@router.delete(
    "/processes/{uuid:process_id}",
    response={204: None},
    summary="Delete a process and its steps",
)
def delete_process(request: HttpRequest, process_id: uuid.UUID):
    services.delete_process(process_id, broadcast=api_broadcast_process_data(request))
    return Status(204, None)


@router.api_operation(["GET", "DELETE"], "/processes/{workflow_key}", include_in_schema=False)
def process_id_not_a_uuid(request: HttpRequest, workflow_key: str):
    """GET/DELETE with an id that is not a UUID land here (the UUID routes did not match)."""
    raise HttpError(400, f"{workflow_key!r} is not a process id: process ids are UUIDs")
