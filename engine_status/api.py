"""REST endpoints for the engine status and its global lock."""

from django.http import HttpRequest
from ninja import Router, Schema
from pydantic import ConfigDict, StrictBool

from engine_status import services
from engine_status.selectors import GlobalStatus, get_engine_status

router = Router(tags=["engine"])


class EngineStatusOut(Schema):
    global_lock: bool
    running_processes: int
    global_status: GlobalStatus


class EngineLockIn(Schema):
    model_config = ConfigDict(extra="forbid")
    global_lock: StrictBool


@router.get("/settings/status", response=EngineStatusOut, summary="The engine status")
def engine_status(request: HttpRequest):
    return get_engine_status().as_dict()


@router.put(
    "/settings/status",
    response=EngineStatusOut,
    summary="Lock (pause) or unlock the engine",
    description="Locking stops running processes at their next step boundary and refuses new "
    "starts and resumes with 503; unlocking resumes the processes the lock paused.",
)
def set_engine_lock(request: HttpRequest, payload: EngineLockIn):
    return services.set_global_lock(payload.global_lock).as_dict()
