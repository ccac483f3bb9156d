"""The JSON API: routers of both apps, the OpenAPI schema, and errors as 4xx JSON.
Every error body has a ``detail`` message; validation errors add ``errors`` with one entry per
problem. Validation failures answer 400 (orchestrator-core's convention) rather than ninja's 422.
"""

import logging

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse
from ninja import NinjaAPI
from ninja.errors import ValidationError

from engine_status.api import router as engine_router
from processes.api import router as processes_router
from processes.services import EngineLocked, ProcessConflict, ProcessNotFound, UnknownWorkflow
from processes.workflow import FormInputError

logger = logging.getLogger(__name__)

api = NinjaAPI(
    title="orchestrator-ws",
    version="1.0.0",
    description="Workflow processes, their steps and the engine lock. Live updates of the same "
    "data are pushed over websockets; see docs/websocket-protocol.md.",
    openapi_url="/openapi.json",
    docs_url="/docs",
)
api.add_router("", processes_router)
api.add_router("", engine_router)

_STATUS_OF_ERROR = {
    UnknownWorkflow: 404,
    ProcessNotFound: 404,
    ProcessConflict: 409,
    EngineLocked: 503,
}


def _error(request: HttpRequest, exc: Exception) -> HttpResponse:
    return api.create_response(request, {"detail": str(exc)}, status=_STATUS_OF_ERROR[type(exc)])


for error_class in _STATUS_OF_ERROR:
    api.add_exception_handler(error_class, _error)


@api.exception_handler(RequestDataTooBig)
def _body_too_big(request: HttpRequest, exc: RequestDataTooBig) -> HttpResponse:
    # Unhandled, ninja answers it with a 500 under DEBUG (Django's HTML 400 otherwise).
    detail = f"request body larger than {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes"
    return api.create_response(request, {"detail": detail}, status=413)


def _database_unavailable(request: HttpRequest, exc: Exception) -> HttpResponse:
    """The database refused a connection (PostgreSQL's "too many clients", a restart) or held
    its lock past the timeout: the request's transaction rolled back, so nothing half-done is
    left and the client may simply retry."""
    logger.warning("%s %s: database unavailable: %s", request.method, request.path, exc)
    reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
    response = api.create_response(request, {"detail": f"database unavailable, retry: {reason}"}, status=503)
    response["Retry-After"] = "1"
    return response


for error_class in (OperationalError, InterfaceError):
    api.add_exception_handler(error_class, _database_unavailable)


@api.exception_handler(FormInputError)
def _invalid_form(request: HttpRequest, exc: FormInputError) -> HttpResponse:
    return api.create_response(request, {"detail": "invalid input", "errors": exc.errors}, status=400)


@api.exception_handler(ValidationError)
def _invalid_request(request: HttpRequest, exc: ValidationError) -> HttpResponse:
    errors = [
        {
            "field": ".".join(str(part) for part in error.get("loc", ())),
            "message": error.get("msg", "invalid"),
        }
        for error in exc.errors
    ]
    return api.create_response(request, {"detail": "invalid request", "errors": errors}, status=400)
