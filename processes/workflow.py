"""Workflows defined in Python: steps, input steps, forms and the registry that lists them.

A workflow is an ordered list of steps ending in :data:`done`. A step is a named function that
receives the process state and returns a dict merged into it::

    @step("Reserve address")
    def reserve_address(subnet: str) -> dict:
        return {"address": allocate(subnet)}

Parameters are filled from the state by name; a single parameter called ``state`` receives the
whole dict instead, and a parameter called ``attempt`` receives how many times this step has now
been tried in this process (1 on the first run, 2 after one failure), so retry logic needs no
hidden storage. An :func:`inputstep` suspends the process until a user resumes it with input
that its pydantic form accepts.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from processes.models import Assignee

State = dict[str, Any]


class Target(StrEnum):
    CREATE = "CREATE"
    MODIFY = "MODIFY"
    TERMINATE = "TERMINATE"
    SYSTEM = "SYSTEM"


class Form(BaseModel):
    """Base class for workflow input forms: unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


class StepWaiting(Exception):
    """Raise from a step to park the process as ``waiting`` (e.g. on an external system)."""


class ApiUnavailable(Exception):
    """Raise from a step when a system it calls is down; the process becomes ``api_unavailable``."""


class InconsistentData(Exception):
    """Raise from a step when the data it found contradicts the state; ``inconsistent_data``."""


class FormInputError(Exception):
    """User input rejected by a form; ``errors`` lists each field problem."""

    def __init__(self, errors: list[dict[str, Any]]):
        super().__init__("invalid input")
        self.errors = errors


@dataclass(frozen=True)
class Step:
    name: str
    func: Callable[..., State | None] | None = None
    # Set on input steps: the form the user's input must satisfy when resuming.
    form: type[Form] | None = None
    assignee: Assignee = Assignee.SYSTEM
    is_done: bool = False

    @property
    def is_input(self) -> bool:
        return self.form is not None

    @cached_property
    def _parameters(self) -> Mapping[str, inspect.Parameter]:
        """The function's parameters, looked up once (``inspect.signature`` costs about 10 us,
        and every run of the step asks twice)."""
        return inspect.signature(self.func).parameters if self.func is not None else {}

    @cached_property
    def _takes_everything(self) -> bool:
        return any(p.kind is p.VAR_KEYWORD for p in self._parameters.values())

    @property
    def wants_attempt(self) -> bool:
        """Whether the function takes ``attempt`` (counting attempts costs a query)."""
        return "attempt" in self._parameters or self._takes_everything

    def run(self, state: State, attempt: int) -> State:
        """Call the step function with what it asks for; return the dict to merge."""
        if self.func is None:
            return {}
        params = self._parameters
        if list(params) == ["state"]:
            result = self.func(dict(state))
        else:
            available = {**state, "attempt": attempt}
            takes_everything = self._takes_everything
            kwargs = {name: value for name, value in available.items() if takes_everything or name in params}
            result = self.func(**kwargs)
        if result is None:
            return {}
        if not isinstance(result, dict):
            raise TypeError(f"step {self.name!r} returned {type(result).__name__}, expected a dict")
        return result


def step(name: str) -> Callable[[Callable[..., State | None]], Step]:
    """Decorator turning a function into a named workflow step."""

    def wrap(func: Callable[..., State | None]) -> Step:
        return Step(name=name, func=func)

    return wrap


def inputstep(name: str, form: type[Form], assignee: Assignee = Assignee.SYSTEM) -> Step:
    """A step that suspends the process until a user resumes it with input for ``form``."""
    return Step(name=name, form=form, assignee=assignee)


done = Step(name="Done", is_done=True)


def validate_form(form: type[Form] | None, user_inputs: list[dict[str, Any]]) -> State:
    """Merge the pages of user input and validate them; returns the JSON-ready state delta.

    Without a form, the merged input is taken as it is (resuming a failed step may carry
    corrections for the state).
    """
    merged: State = {}
    for page in user_inputs:
        merged.update(page)
    if form is not None:
        try:
            merged = form.model_validate(merged).model_dump(mode="json")
        except ValidationError as exc:
            raise FormInputError(
                [
                    {"field": ".".join(str(p) for p in error["loc"]), "message": error["msg"]}
                    for error in exc.errors()
                ]
            ) from None
    errors = _unstorable(merged)
    if errors:
        raise FormInputError(errors)
    return merged


# Deeper input parses, but serializing it again (to store it, to answer with it) can exhaust the
# interpreter's recursion limit.
MAX_INPUT_DEPTH = 100


def _unstorable(state: State) -> list[dict[str, Any]]:
    """Field errors for values a JSON column refuses: NaN, infinities, NUL, lone surrogates.

    Python's json module parses ``NaN``, ``Infinity`` and lone surrogates (``"\\ud800"``), which
    SQLite's JSON check and PostgreSQL's jsonb reject, as jsonb rejects ``"\\u0000"``. Walked with
    a stack, not recursion: input nested as deep as the JSON parser allows must not overflow here.
    """
    bad_text = "must not contain NUL characters or unpaired surrogates"
    errors = []
    stack: list[tuple[tuple[str, ...], Any]] = [((str(key),), value) for key, value in state.items()]
    while stack:
        path, value = stack.pop()
        field = ".".join(path)
        if len(path) > MAX_INPUT_DEPTH:
            errors.append({"field": field, "message": f"nested more than {MAX_INPUT_DEPTH} levels deep"})
            continue
        if not _storable_text(path[-1]):
            errors.append({"field": field, "message": f"field names {bad_text}"})
        if isinstance(value, float) and not math.isfinite(value):
            errors.append({"field": field, "message": "numbers must be finite"})
        elif isinstance(value, str) and not _storable_text(value):
            errors.append({"field": field, "message": f"text {bad_text}"})
        elif isinstance(value, dict):
            stack.extend(((*path, str(key)), item) for key, item in value.items())
        elif isinstance(value, list):
            stack.extend(((*path, str(index)), item) for index, item in enumerate(value))
    return sorted(errors, key=lambda error: error["field"])


def _storable_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return "\x00" not in text


@dataclass(frozen=True)
class Workflow:
    key: str
    description: str
    steps: tuple[Step, ...]
    target: Target = Target.SYSTEM
    is_task: bool = False
    initial_form: type[Form] | None = None
    step_names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        if not self.steps or not self.steps[-1].is_done:
            raise ValueError(f"workflow {self.key!r} must end with the done step")
        if any(s.is_done for s in self.steps[:-1]):
            raise ValueError(f"workflow {self.key!r} has a done step before its end")
        object.__setattr__(self, "step_names", tuple(s.name for s in self.steps))

    def describe(self) -> dict[str, Any]:
        """The registry entry served by ``GET /api/workflows/``."""
        return {
            "name": self.key,
            "description": self.description,
            "target": self.target.value,
            "is_task": self.is_task,
            "steps": list(self.step_names),
            "form": self.initial_form.model_json_schema() if self.initial_form else None,
        }


class WorkflowRegistry:
    """The workflows this server can run, by key."""

    def __init__(self) -> None:
        self._workflows: dict[str, Workflow] = {}

    def register(self, workflow: Workflow) -> Workflow:
        existing = self._workflows.get(workflow.key)
        if existing is not None and existing is not workflow:
            raise ValueError(f"workflow {workflow.key!r} is registered twice")
        self._workflows[workflow.key] = workflow
        return workflow

    def get(self, key: str) -> Workflow | None:
        return self._workflows.get(key)

    def __iter__(self) -> Iterable[Workflow]:
        return iter(sorted(self._workflows.values(), key=lambda wf: wf.key))


registry = WorkflowRegistry()


def register(workflow: Workflow) -> Workflow:
    """Add a workflow to the registry (call it at import time of a WORKFLOW_MODULES module)."""
    return registry.register(workflow)
