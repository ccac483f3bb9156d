"""REST endpoints for workflows and processes (orchestrator-core's paths)."""

import logging
import uuid
from typing import Any, Literal

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.http import HttpRequest
from ninja import Body, Query, Router, Schema, Status
from ninja.errors import HttpError
from ninja.pagination import LimitOffsetPagination, paginate
from pydantic import Field, field_validator

from orchestrator_ws.realtime.layers import FanoutChannelLayer
from processes import messages, selectors, services
from processes.messages import process_summary
from processes.models import ProcessStatus, StepStatus
from processes.process_data_broadcast import api_broadcast_process_data
from processes.workflow import registry

logger = logging.getLogger(__name__)
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

    @field_validator("workflow")
    @classmethod
    def _no_nul(cls, workflow: str | None) -> str | None:
        if workflow is not None and "\x00" in workflow:  # PostgreSQL refuses NUL in text
            raise ValueError("must not contain NUL characters")
        return workflow


class CreatedOut(Schema):
    id: uuid.UUID


def _user(request: HttpRequest) -> str:
    user = getattr(request, "user", None)
    return user.get_username() if user is not None and user.is_authenticated else "anonymous"


@router.get("/workflows/", response=list[WorkflowOut], summary="List the registered workflows")
def list_workflows(request: HttpRequest):
    return [workflow.describe() for workflow in registry]


class _Summaries:
    """A queryset seen as summaries: the paginator slices it, then only that page is built.

    ``seq`` is the process-list group's seq, read before the query runs: a client that follows
    the list websocket with ``?since=<seq>`` misses no change made after its page was read.
    """

    def __init__(self, processes, seq: int | None):
        self._processes = processes
        self.seq = seq

    def __len__(self) -> int:
        return self._processes.count()

    def __getitem__(self, page: slice) -> list[dict[str, Any]]:
        return [process_summary(process) for process in self._processes[page]]


class ProcessListPagination(LimitOffsetPagination):
    class Input(Schema):
        # Databases take LIMIT and OFFSET as signed 64-bit integers: larger ones are a 400, not a 500.
        limit: int = Field(100, ge=1, le=2**63 - 1)
        offset: int = Field(0, ge=0, le=2**63 - 1)

    class Output(Schema):
        items: list[Any]
        count: int
        seq: int | None = Field(
            description="the process-list websocket's seq when this page was read; "
            "connect with ?since=<seq> to follow it without a gap (null when unknown)"
        )

    def paginate_queryset(self, queryset: _Summaries, pagination, request: HttpRequest, **params):
        return {**super().paginate_queryset(queryset, pagination, request, **params), "seq": queryset.seq}


def _process_list_seq() -> int | None:
    layer = get_channel_layer()
    if not isinstance(layer, FanoutChannelLayer):
        return None
    try:
        return async_to_sync(layer.group_seq)(messages.PROCESS_LIST_GROUP)
    except Exception as exc:
        logger.warning("could not read the process list's seq: %s", exc or type(exc).__name__)
        return None


@router.get("/processes/", response=list[ProcessSummaryOut], summary="List processes, newest first")
@paginate(ProcessListPagination)
def list_processes(request: HttpRequest, filters: Query[ProcessFilters]):
    seq = _process_list_seq()
    return _Summaries(selectors.list_processes(status=filters.status, workflow=filters.workflow), seq)


@router.get(
    "/processes/{uuid:process_id}",
    response=ProcessDetailOut,
    summary="One process with its logged and pending steps",
)
def get_process(request: HttpRequest, process_id: uuid.UUID):
    return selectors.process_detail(services.existing_process(process_id))


class ResumeFormOut(Schema):
    form: dict[str, Any] | None = Field(
        description="JSON schema of the input a resume of this process takes; null: none"
    )


@router.get(
    "/processes/{uuid:process_id}/resume-form",
    response=ResumeFormOut,
    summary="The input form a resume of this process expects (a suspended input step's form)",
)
def resume_form(request: HttpRequest, process_id: uuid.UUID):
    form = selectors.resume_form(services.existing_process(process_id))
    return {"form": form.model_json_schema() if form is not None else None}


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
