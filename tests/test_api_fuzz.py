"""Fuzzing every REST endpoint: whatever a client sends, the answer is a 2xx or a 4xx, never a 5xx.

Requests go in-process through Django's WSGI handler (real middleware, test database, worker
pool). Schemathesis generates them from ``/api/openapi.json``, both data that fits the schema
(positive) and data that breaks it (negative: wrong types, missing or extra fields, path ids that
are not UUIDs). The other tests add what a schema cannot describe: malformed, truncated, binary,
huge and deeply nested bodies under any content type; JSON values a database refuses to store
(NaN, infinities, NUL characters, lone surrogates); ids and workflow keys that are not UUIDs or do
not exist; unsupported methods; wrong-typed and out-of-range query parameters. Each sends a list
of known edge cases, every one of them, then lets hypothesis explore around them.

The one 5xx the API documents is 503 for a start or resume while the engine is locked; the
schema-driven tests lock it for about half of their requests, and a 503 is accepted only then.
Every test ends by checking that the server still answers ordinary requests.

Hypothesis runs derandomized: every run sends the same requests, so CI is deterministic.
"""

from __future__ import annotations

import json
import time
import types
import uuid
from collections.abc import Sequence
from urllib.parse import quote, urlencode

import pytest
import schemathesis
from django.conf import settings as django_settings
from django.core.wsgi import get_wsgi_application
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.generation.hypothesis import setup as setup_hypothesis_for_schemathesis
from werkzeug.test import Client

from engine_status.selectors import is_locked
from processes.models import ProcessStatus
from processes.workflow import registry
from tests.helpers import wait_until

pytestmark = pytest.mark.django_db(transaction=True)

HOST = {"Host": "localhost"}

# Schemathesis patches hypothesis the first time it builds a strategy (a larger buffer for each
# example, no pretty-printing): patch it up front, so that every test generates the same requests
# whichever tests ran before it.
setup_hypothesis_for_schemathesis()


def fuzz_settings(max_examples: int) -> hypothesis_settings:
    return hypothesis_settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


WORKFLOWS = ("GET", "/api/workflows/")
ENGINE_STATUS = ("GET", "/api/settings/status")
START = ("POST", "/api/processes/{workflow_key}")
RESUME = ("PUT", "/api/processes/{process_id}/resume")
LOCK = ("PUT", "/api/settings/status")
PROCESS_LIST = ("GET", "/api/processes/")
ID_OPERATIONS = [
    ("GET", "/api/processes/{process_id}"),
    ("DELETE", "/api/processes/{process_id}"),
    RESUME,
    ("PUT", "/api/processes/{process_id}/abort"),
    ("GET", "/api/processes/{process_id}/resume-form"),
]
# Every operation of the schema; the schema test fails when the schema has one not listed here.
OPERATIONS = [WORKFLOWS, PROCESS_LIST, *ID_OPERATIONS, START, ENGINE_STATUS, LOCK]


def workflow_keys() -> list[str]:
    return [workflow.key for workflow in registry]


class Server:
    """The Django app behind a WSGI test client; every answer is checked to be 2xx or 4xx."""

    def __init__(self) -> None:
        self.app = get_wsgi_application()
        self.client = Client(self.app)
        self.requests = 0

    def check(self, operation: tuple[str, str], status: int, body: bytes, *, locked: bool, request: str):
        self.requests += 1
        if status == 503 and locked and operation in (START, RESUME):
            return  # documented: the engine is locked
        assert 200 <= status < 300 or 400 <= status < 500, (
            f"server answered {status} to:\n{request}\n"
            f"response body (end):\n{body[-3000:].decode('utf-8', 'replace')}"
        )

    def send(
        self,
        operation: tuple[str, str],
        path: str,
        *,
        method: str | None = None,
        query: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        content_type: str | None = "application/json",
    ) -> None:
        """Send a raw request aimed at ``operation`` (with its method unless ``method`` is given)."""
        method = method or operation[0]
        headers = dict(HOST)
        if content_type is not None:
            headers["Content-Type"] = content_type
        query_string = urlencode(
            [(k.encode("utf-8", "surrogatepass"), v.encode("utf-8", "surrogatepass")) for k, v in query]
        )
        locked = is_locked()
        response = self.client.open(
            path=path, method=method, query_string=query_string, data=body, headers=headers
        )
        request = (
            f"{method} {path}{'?' + query_string if query_string else ''}\n"
            f"Content-Type: {content_type!r}\nbody ({len(body)} bytes): {body[:500]!r}"
        )
        self.check(operation, response.status_code, response.get_data(), locked=locked, request=request)

    def call(self, case: schemathesis.Case) -> None:
        """Send a schemathesis case to the same app."""
        locked = is_locked()
        response = case.call(headers=HOST)
        self.check(
            (case.method.upper(), case.operation.path),
            response.status_code,
            response.content,
            locked=locked,
            request=case.as_curl_command(headers=HOST),
        )

    def json(self, method: str, path: str, body=None) -> tuple[int, object]:
        data = b"" if body is None else json.dumps(body).encode()
        response = self.client.open(
            path=path, method=method, data=data, headers={**HOST, "Content-Type": "application/json"}
        )
        content = response.get_data()
        return response.status_code, json.loads(content) if content else None

    def set_lock(self, locked: bool) -> None:
        if is_locked() != locked:
            status, engine = self.json("PUT", "/api/settings/status", {"global_lock": locked})
            assert status == 200, engine

    def assert_still_works(self, at_least: int) -> None:
        """After the fuzzing (``at_least`` requests): the engine unlocks, lists the workflows, and
        starts and runs a process."""
        assert self.requests >= at_least
        status, engine = self.json("PUT", "/api/settings/status", {"global_lock": False})
        assert status == 200 and engine["global_lock"] is False, engine
        status, workflows = self.json("GET", "/api/workflows/")
        assert status == 200, workflows
        assert {w["name"] for w in workflows} == set(workflow_keys())
        status, created = self.json("POST", "/api/processes/quick_steps", [])
        assert status == 201, created
        wait_until(
            lambda: self.json("GET", f"/api/processes/{created['id']}")[1]["last_status"] == "completed",
            what="the process started after the fuzzing to complete",
        )
        status, page = self.json("GET", "/api/processes/?limit=1")
        assert status == 200 and page["items"], page


@pytest.fixture
def server(settings, monkeypatch) -> Server:
    # Under DEBUG, ninja answers every exception a view raises with a 500 and its traceback, also
    # those Django's handler would turn into a 4xx: fuzz in the stricter mode, with tracebacks.
    settings.DEBUG = True
    # long_running sleeps up to 60 s per step and the worker pool stops at step boundaries after
    # each test: cap its sleeps so that a generated step_delay cannot stall the test.
    monkeypatch.setattr(
        "processes.demo_workflows.time", types.SimpleNamespace(sleep=lambda s: time.sleep(min(s, 0.02)))
    )
    return Server()


@pytest.fixture
def schema(server):
    return schemathesis.openapi.from_wsgi("/api/openapi.json", server.app, headers=HOST)


@pytest.fixture
def processes(server) -> dict[str, list[str]]:
    """Ids of processes in each state a resume can meet, by state: several of the resumable
    ones, since a valid resume moves one on."""
    ids: dict[str, list[str]] = {}
    for workflow, inputs, status, count in [
        ("quick_steps", [{"name": "fuzz"}], ProcessStatus.COMPLETED, 1),
        ("confirm_input", [], ProcessStatus.SUSPENDED, 3),
        ("flaky_retry", [], ProcessStatus.FAILED, 3),
    ]:
        for _ in range(count):
            code, created = server.json("POST", f"/api/processes/{workflow}", inputs)
            assert code == 201, created
            ids.setdefault(status, []).append(created["id"])
    for status, state_ids in ids.items():
        for pid in state_ids:
            wait_until(
                lambda pid=pid, status=status: (
                    server.json("GET", f"/api/processes/{pid}")[1]["last_status"] == status
                ),
                what=f"process {pid} to be {status}",
            )
    return ids


@pytest.fixture
def process_ids(processes) -> list[str]:
    return [pid for state_ids in processes.values() for pid in state_ids]


# -- values -----------------------------------------------------------------------------------

# Values Python's json module parses but a JSON column may refuse, or at the edge of their type.
EDGE_VALUES = [
    float("nan"),
    float("inf"),
    float("-inf"),
    1e308,
    -0.0,
    2**63,
    -(2**63) - 1,
    10**40,
    "",
    "\x00",
    "a\x00b",
    "\ud800",
    "\udfff",
    "\U0001f600",
    "x" * 10_000,
]
TEXT = st.text(max_size=40) | st.sampled_from([v for v in EDGE_VALUES if isinstance(v, str)])
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | TEXT
    | st.sampled_from(EDGE_VALUES)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=12,
)
# The demo workflows' form fields and the engine lock's, so that values of every type reach them.
FIELDS = ["name", "step_delay", "approved", "comment", "global_lock"]
KEYS = st.sampled_from(FIELDS) | TEXT
PAGES = st.dictionaries(KEYS, JSON_VALUES, max_size=4)
# Mostly the shape the endpoints take, a list of pages: with one edge value (another invalid value
# would mask it with its 400) or with any values; sometimes anything else.
JSON_BODIES = st.one_of(
    st.builds(lambda key, value: [{key: value}], KEYS, st.sampled_from(EDGE_VALUES)),
    st.builds(lambda key, value: [{key: value}], KEYS, JSON_VALUES),
    st.lists(PAGES, max_size=3),
    PAGES,
    JSON_VALUES,
)


def _json_text(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass")


def _nested(depth: int) -> bytes:
    return b'[{"name": ' + b"[" * depth + b"]" * depth + b"}]"


# Sent as they are (generating such sizes would take most of the time), each of them.
BIG_BODIES = [
    b"[" * 100_000 + b"]" * 100_000,  # deeper than the JSON parser's recursion limit
    *(_nested(depth) for depth in (99, 100, 101, 500, 5_000)),
    b"[" + b"{}," * 100_000 + b"{}]",  # many pages
    json.dumps([{f"k{i}": i for i in range(20_000)}]).encode(),  # many fields
    json.dumps([{"name": "x" * 2_000_000}]).encode(),  # just under DATA_UPLOAD_MAX_MEMORY_SIZE
    b"[" + b" " * django_settings.DATA_UPLOAD_MAX_MEMORY_SIZE + b"]",  # just over it
    b'[{"name": 1' + b"0" * 5_000 + b"}]",  # more digits than int() takes
    b"\xff\xfe[\x00]\x00",  # UTF-16 with a BOM
    b"\xef\xbb\xbf[]",  # UTF-8 with a BOM
    b'[{"name": "\\ud800"}, {"\\u0000": 1}]',  # escapes of a lone surrogate and of NUL
]
# Around the depths where parsing the JSON, or serializing it again to store it, exceeds Python's
# recursion limit; where exactly depends on the stack depths of the parser and of the serializer.
DEEP_BODIES = [_nested(depth) for depth in range(700, 1_000, 10)]
RAW_BODIES = st.one_of(
    JSON_BODIES.map(_json_text),
    st.tuples(JSON_BODIES.map(_json_text), st.integers(min_value=0)).map(  # truncated
        lambda pair: pair[0][: pair[1] % max(len(pair[0]), 1)]
    ),
    st.binary(max_size=200),
    TEXT.map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.sampled_from(
        [b"", b"null", b"{", b"[", b"[{]", b"[}", b"'[]'", b"[{'a': 1}]", b"[1,]", b"[NaN]", b"[-Infinity]"]
    ),
)
CONTENT_TYPES = st.sampled_from(
    [
        "application/json",
        "application/json; charset=latin-1",
        "application/json; charset=no-such-codec",
        "application/merge-patch+json",
        "text/plain",
        "text/html",
        "application/xml",
        "application/octet-stream",
        "application/x-www-form-urlencoded",
        "multipart/form-data",  # no boundary
        "multipart/form-data; boundary=fuzz",
        "*/*",
        "",
        "json",
        None,  # no Content-Type header at all
    ]
)

VALID_UUID = "8c1b2d3e-4f50-4a6b-8c7d-9e0f1a2b3c4d"
ODD_IDS = [
    "",
    " ",
    "0",
    "-1",
    "null",
    "all",
    "resume",
    "00000000-0000-0000-0000-000000000000",
    "ffffffff-ffff-ffff-ffff-ffffffffffff",
    VALID_UUID.upper(),
    VALID_UUID.replace("-", ""),
    "{" + VALID_UUID + "}",
    "urn:uuid:" + VALID_UUID,
    VALID_UUID + "0",
    VALID_UUID[:-1] + "g",
    VALID_UUID + "\x00",
    "\x00",
    "%00",
    "\udcff",
    "\U0001f600",
    "../workflows",
    "a" * 5_000,
]
EDGE_NUMBERS = [
    "0",
    "-1",
    str(2**31),
    str(2**63 - 1),
    str(2**63),
    str(2**64),
    str(-(2**63)),
    str(-(2**63) - 1),
    str(10**30),
    "9" * 5_000,
    "1e3",
    "1.5",
    "0x10",
    " 1",
    "+1",
    "1_000",
    "\u0663",  # ARABIC-INDIC DIGIT THREE: int() takes it
    "NaN",
    "inf",
]
EDGE_TEXTS = ["", "true", "null", "[]", "\x00", "a\x00b", "\udcff", "\U0001f600", "x" * 255, "x" * 256]
NUMBERS = st.integers().map(str) | st.sampled_from(EDGE_NUMBERS)
QUERY_VALUES = st.one_of(
    NUMBERS,
    st.sampled_from([str(status) for status in ProcessStatus]),
    st.sampled_from(EDGE_TEXTS),
    TEXT,
    st.text(min_size=250, max_size=300),  # around the workflow filter's max_length
)
LIST_PARAMETERS = {"limit": NUMBERS, "offset": NUMBERS, "status": QUERY_VALUES, "workflow": QUERY_VALUES}
# GET /api/processes/'s parameters: one at a time (another invalid one would mask its value with
# its 400), or all of them mixed with others, repeated or not.
PROCESS_LIST_QUERIES = st.one_of(
    st.one_of([values.map(lambda v, name=name: [(name, v)]) for name, values in LIST_PARAMETERS.items()]),
    st.tuples(
        st.fixed_dictionaries({}, optional=LIST_PARAMETERS).map(lambda params: list(params.items())),
        st.lists(st.tuples(st.sampled_from(list(LIST_PARAMETERS)) | TEXT, QUERY_VALUES), max_size=3),
    ).map(lambda parts: parts[0] + parts[1]),
)
METHODS = st.sampled_from(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])


def _segment(value: str) -> str:
    return quote(value.encode("utf-8", "surrogatepass"), safe="")


# -- schema-driven ----------------------------------------------------------------------------


def operation_cases(schema, operation: tuple[str, str], mode: GenerationMode, process_ids: list[str]):
    """The operation's cases, half of them aimed at the registered workflows or real processes.

    Generated workflow keys and process ids almost never exist: without the aimed cases, the
    validation behind them (the workflows' forms, the process states) would never run.
    """
    method, path = operation
    api_operation = schema[path][method]
    if operation == START:
        fixed = [{"workflow_key": key} for key in workflow_keys()]
    elif operation in ID_OPERATIONS and method != "DELETE":  # deleting would leave 404s only
        fixed = [{"process_id": pid} for pid in process_ids]
    else:
        fixed = []
    if mode is GenerationMode.NEGATIVE and not api_operation.body:
        fixed = []  # with the path fixed, nothing is left to break
    generated = api_operation.as_strategy(generation_mode=mode)
    if not fixed:
        return generated
    aimed = [api_operation.as_strategy(generation_mode=mode, path_parameters=params) for params in fixed]
    return st.one_of(generated, st.one_of(aimed))


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_schema_generated_requests_never_get_a_server_error(server, schema, process_ids, mode):
    assert {(op.ok().method.upper(), op.ok().path) for op in schema.get_all_operations()} == set(OPERATIONS)
    for operation in OPERATIONS:
        if mode is GenerationMode.NEGATIVE and operation in {WORKFLOWS, ENGINE_STATUS}:
            continue  # no parameter and no body: nothing to break

        @fuzz_settings(30)
        @given(case=operation_cases(schema, operation, mode, process_ids), locked=st.booleans())
        def fuzz(case, locked):
            server.set_lock(locked)  # starts and resumes get a 503 while it is locked, nothing else
            server.call(case)

        fuzz()
    server.assert_still_works(at_least=150)


# -- bodies -----------------------------------------------------------------------------------


def body_targets(processes: dict[str, list[str]]) -> list[tuple[tuple[str, str], list[str]]]:
    """Each body-taking operation in each situation that validates a body its own way, with the
    paths that reach it."""
    resume = "/api/processes/{}/resume".format
    return [
        *((START, [f"/api/processes/{key}"]) for key in [*workflow_keys(), "no_such_workflow"]),
        (RESUME, [resume(pid) for pid in processes[ProcessStatus.SUSPENDED]]),
        (RESUME, [resume(pid) for pid in processes[ProcessStatus.FAILED]]),
        (RESUME, [resume(pid) for pid in processes[ProcessStatus.COMPLETED]]),
        (RESUME, [resume(uuid.UUID(int=1))]),
        (LOCK, ["/api/settings/status"]),
    ]


def test_malformed_bodies_never_get_a_server_error(server, processes):
    # Every huge body to a start with a form and one without, to resumes of a suspended and of a
    # failed process, and to the lock; the deep ones where input is stored as it is.
    stored_as_is = [
        (START, "/api/processes/flaky_retry"),
        (RESUME, f"/api/processes/{processes[ProcessStatus.FAILED][-1]}/resume"),
    ]
    for operation, path in [
        *stored_as_is,
        (START, "/api/processes/quick_steps"),
        (RESUME, f"/api/processes/{processes[ProcessStatus.SUSPENDED][-1]}/resume"),
        (LOCK, "/api/settings/status"),
    ]:
        for body in BIG_BODIES:
            server.send(operation, path, body=body)
    for operation, path in stored_as_is:
        for body in DEEP_BODIES:
            server.send(operation, path, body=body)

    for operation, paths in body_targets(processes):

        @fuzz_settings(25)
        @given(path=st.sampled_from(paths), body=JSON_BODIES)
        def fuzz_json(path, body):
            # Well-formed JSON of every shape, with the values a database refuses (NaN, NUL, ...).
            server.set_lock(False)
            server.send(operation, path, body=_json_text(body))  # noqa: B023

        @fuzz_settings(15)
        @given(path=st.sampled_from(paths), body=RAW_BODIES, content_type=CONTENT_TYPES)
        def fuzz_raw(path, body, content_type):
            # Malformed, truncated and binary bodies, under any content type.
            server.set_lock(False)
            server.send(operation, path, body=body, content_type=content_type)  # noqa: B023

        fuzz_json()
        fuzz_raw()
    server.assert_still_works(at_least=300)


# -- ids, methods and query parameters --------------------------------------------------------


def test_odd_ids_methods_and_query_parameters_never_get_a_server_error(server, process_ids):
    # Every odd id on every operation taking one, every odd workflow key on a start.
    for operation in ID_OPERATIONS:
        for odd_id in ODD_IDS:
            server.send(operation, operation[1].replace("{process_id}", _segment(odd_id)), body=b"[]")
    for key in ODD_IDS:
        server.send(START, f"/api/processes/{_segment(key)}", body=b"[]")
    # Every edge value on each of the process list's parameters, alone.
    for name in LIST_PARAMETERS:
        for value in [*EDGE_NUMBERS, *EDGE_TEXTS]:
            server.send(PROCESS_LIST, "/api/processes/", query=[(name, value)])

    ids = st.one_of(st.uuids().map(str), st.sampled_from(process_ids), st.sampled_from(ODD_IDS), TEXT)
    keys = st.one_of(st.sampled_from(workflow_keys()), st.sampled_from(ODD_IDS), TEXT)
    requests = st.one_of(
        # (operation, path, method): an operation with any id or workflow key ...
        st.builds(
            lambda op, i: (op, op[1].replace("{process_id}", _segment(i)), op[0]),
            st.sampled_from(ID_OPERATIONS),
            ids,
        ),
        st.builds(lambda k: (START, f"/api/processes/{_segment(k)}", "POST"), keys),
        # ... or with any method: the unsupported ones must be a 405, not an error.
        st.builds(
            lambda op, i, k, m: (
                op,
                op[1].replace("{process_id}", _segment(i)).replace("{workflow_key}", _segment(k)),
                m,
            ),
            st.sampled_from(OPERATIONS),
            ids,
            keys,
            METHODS,
        ),
    )

    @fuzz_settings(150)
    @given(request=requests, query=st.lists(st.tuples(TEXT, QUERY_VALUES), max_size=3))
    def fuzz_paths(request, query):
        server.set_lock(False)
        operation, path, method = request
        server.send(operation, path, method=method, query=query, body=b"[]")

    @fuzz_settings(150)
    @given(query=PROCESS_LIST_QUERIES)
    def fuzz_process_list(query):
        server.send(PROCESS_LIST, "/api/processes/", query=query, body=b"")

    fuzz_paths()
    fuzz_process_list()
    server.assert_still_works(at_least=400)
