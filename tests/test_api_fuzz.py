"""Fuzzing every REST endpoint: whatever a client sends, the answer is a 2xx or a 4xx, never a 5xx.

Requests go in-process through Django's WSGI handler (real middleware, test database, worker
pool). Schemathesis generates them from ``/api/openapi.json``, both data that fits the schema
(positive) and data that breaks it (negative: wrong types, missing or extra fields, path ids that
are not UUIDs). Strategies of this module add what a schema cannot describe: malformed, truncated,
huge and deeply nested JSON, other content types, values a database refuses to store as JSON
(NaN, infinities, NUL characters, lone surrogates), unknown and invalid ids, unsupported methods,
and wrong-typed or out-of-range query parameters.

The one 5xx the API documents is 503 for a start or resume while the engine is locked; the
schema-driven tests lock it now and then through ``PUT /api/settings/status``, and a 503 is
accepted only then. Every test ends by checking that the server still answers ordinary requests.

Hypothesis runs derandomized: every run sends the same requests, so CI is deterministic.
"""

from __future__ import annotations

import json
import time
import types
import uuid
from urllib.parse import quote, urlencode

import pytest
import schemathesis
from django.conf import settings as django_settings
from django.core.wsgi import get_wsgi_application
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from werkzeug.test import Client

from engine_status.selectors import is_locked
from processes.models import ProcessStatus
from processes.workflow import registry
from tests.helpers import wait_until

pytestmark = pytest.mark.django_db(transaction=True)

HOST = {"Host": "localhost"}


def fuzz_settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


START = ("POST", "/api/processes/{workflow_key}")
RESUME = ("PUT", "/api/processes/{process_id}/resume")
LOCK = ("PUT", "/api/settings/status")
ID_OPERATIONS = [
    ("GET", "/api/processes/{process_id}"),
    ("DELETE", "/api/processes/{process_id}"),
    RESUME,
    ("PUT", "/api/processes/{process_id}/abort"),
]


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
        query: list[tuple[str, str]] = (),
        body: bytes = b"",
        content_type: str | None = None,
    ) -> None:
        """Send a raw request; ``operation`` is the one it aims at (its method by default)."""
        method = method or operation[0]
        headers = dict(HOST)
        if content_type is not None:
            headers["Content-Type"] = content_type
        query_string = urlencode([(k, v.encode("utf-8", "surrogatepass")) for k, v in query])
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

    def unlock(self) -> None:
        if is_locked():
            assert self.json("PUT", "/api/settings/status", {"global_lock": False})[0] == 200

    def assert_still_works(self) -> None:
        """After the fuzzing: the engine unlocks, lists workflows, and starts and runs a process."""
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
def process_ids(server) -> list[str]:
    """Processes in each state a process id can meet: completed, suspended at its input step,
    and failed; several of the latter two, since a valid resume moves one on."""
    ids = []
    for workflow, inputs, status in [
        ("quick_steps", [{"name": "fuzz"}], ProcessStatus.COMPLETED),
        *[("confirm_input", [], ProcessStatus.SUSPENDED)] * 3,
        *[("flaky_retry", [], ProcessStatus.FAILED)] * 3,
    ]:
        code, created = server.json("POST", f"/api/processes/{workflow}", inputs)
        assert code == 201, created
        ids.append(created["id"])
        wait_until(
            lambda: server.json("GET", f"/api/processes/{ids[-1]}")[1]["last_status"] == status,  # noqa: B023
            what=f"{workflow} to be {status}",
        )
    return ids


def workflow_keys() -> list[str]:
    return [workflow.key for workflow in registry]


# -- strategies -------------------------------------------------------------------------------

TEXT = st.text(max_size=40)  # NUL, lone surrogates and every script included
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([2**63, -(2**63) - 1, 10**40])
    | st.floats(allow_nan=True, allow_infinity=True)
    | TEXT
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=12,
)
# The demo workflows' form fields and the engine lock's, so values of every type reach the forms.
FIELDS = ["name", "step_delay", "approved", "comment", "global_lock"]
PAGES = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), JSON_VALUES, max_size=4)
# Mostly lists of pages, the shape the endpoints take; sometimes anything else.
JSON_BODIES = st.one_of(st.lists(PAGES, max_size=3), st.lists(PAGES, max_size=3), PAGES, JSON_VALUES)


def _nested(depth: int) -> bytes:
    return b'[{"name": ' + b"[" * depth + b"]" * depth + b"}]"


# Built once: generating such sizes would be most of hypothesis's time.
BIG_BODIES = [
    b"[" * 100_000 + b"]" * 100_000,  # deeper than the JSON parser's recursion limit
    *(_nested(depth) for depth in (99, 100, 101, 500, 900, 950, 990, 5_000)),
    b"[" + b"{}," * 100_000 + b"{}]",  # many pages
    json.dumps([{f"k{i}": i for i in range(20_000)}]).encode(),  # many fields
    json.dumps([{"name": "x" * 2_000_000}]).encode(),  # just under DATA_UPLOAD_MAX_MEMORY_SIZE
    b"[" + b" " * django_settings.DATA_UPLOAD_MAX_MEMORY_SIZE + b"]",  # just over it
    b'[{"name": 1' + b"0" * 5_000 + b"}]",  # more digits than int() takes
    b"\xff\xfe[\x00]\x00",  # UTF-16 with a BOM
    b"\xef\xbb\xbf[]",  # UTF-8 with a BOM
]


def _json_text(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass")


RAW_BODIES = st.one_of(
    JSON_BODIES.map(_json_text),  # well-formed, NaN and Infinity included
    st.tuples(JSON_BODIES.map(_json_text), st.integers(min_value=0)).map(  # truncated
        lambda pair: pair[0][: pair[1] % max(len(pair[0]), 1)]
    ),
    st.binary(max_size=200),
    TEXT.map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.sampled_from(
        [b"", b"null", b"{", b"[", b"[{]", b"[}", b"'[]'", b"[{'a': 1}]", b"[1,]", b"[NaN]", b"[-Infinity]"]
    ),
    st.sampled_from(BIG_BODIES),
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
    "../workflows",
    "a" * 5_000,
]
QUERY_VALUES = st.one_of(
    st.integers().map(str),
    st.sampled_from(
        [
            str(2**63 - 1),
            str(2**63),
            str(2**64),
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
            "",
            "true",
            "null",
            "\x00",
            "\udcff",
        ]
    ),
    st.sampled_from([str(status) for status in ProcessStatus]),
    TEXT,
    st.text(min_size=250, max_size=300),  # around the workflow filter's max_length
)
QUERIES = st.lists(
    st.tuples(st.sampled_from(["limit", "offset", "status", "workflow", "page"]) | TEXT, QUERY_VALUES),
    max_size=5,
)
METHODS = st.sampled_from(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])


def _path_segment(value: str) -> str:
    return quote(value.encode("utf-8", "surrogatepass"), safe="")


# -- schema-driven ----------------------------------------------------------------------------


def schema_cases(schema, mode: GenerationMode, process_ids: list[str]):
    """Cases for every operation, plus ones aimed at the registered workflows and real processes.

    Generated workflow keys and process ids almost never exist: without the aimed cases, the
    validation behind them (the workflows' forms, the process states) would never run.
    """
    start = schema[START[1]][START[0]]
    aimed = [
        start.as_strategy(generation_mode=mode, path_parameters={"workflow_key": key})
        for key in workflow_keys()
    ]
    for method, path in ID_OPERATIONS:
        if method == "DELETE":
            continue  # would delete the processes the other cases aim at
        if mode is GenerationMode.NEGATIVE and (method, path) != RESUME:
            continue  # with the id fixed, nothing is left to break
        aimed += [
            schema[path][method].as_strategy(generation_mode=mode, path_parameters={"process_id": pid})
            for pid in process_ids
        ]
    return st.one_of(schema.as_strategy(generation_mode=mode), st.one_of(aimed))


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_schema_generated_requests_never_get_a_server_error(server, schema, process_ids, mode):
    seen = set()

    @fuzz_settings(150)
    @given(case=schema_cases(schema, mode, process_ids))
    def fuzz(case):
        server.call(case)
        seen.add((case.method.upper(), case.operation.path))
        print("SEEN", mode, case.method, case.operation.path)

    fuzz()
    # Every operation of the schema was exercised; negative data needs something to break, a
    # parameter or a body, which the two GETs without parameters do not have.
    expected = {(op.ok().method.upper(), op.ok().path) for op in schema.get_all_operations()}
    if mode is GenerationMode.NEGATIVE:
        expected -= {("GET", "/api/workflows/"), ("GET", "/api/settings/status")}
    assert seen == expected
    print("REQUESTS", server.requests)
    server.assert_still_works()


# -- bodies -----------------------------------------------------------------------------------


def body_targets(process_ids: list[str]) -> list[tuple[tuple[str, str], str]]:
    return [
        *((START, f"/api/processes/{key}") for key in [*workflow_keys(), "no_such_workflow"]),
        *((RESUME, f"/api/processes/{pid}/resume") for pid in [*process_ids, str(uuid.uuid4())]),
        (LOCK, "/api/settings/status"),
    ]


def test_malformed_bodies_never_get_a_server_error(server, process_ids):
    targets = st.sampled_from(body_targets(process_ids))

    @fuzz_settings(150)
    @given(target=targets, body=JSON_BODIES)
    def fuzz_json(target, body):
        # Well-formed JSON of every shape, with the values a database refuses (NaN, NUL, ...).
        server.unlock()
        server.send(target[0], target[1], body=_json_text(body), content_type="application/json")

    @fuzz_settings(120)
    @given(target=targets, body=RAW_BODIES, content_type=CONTENT_TYPES)
    def fuzz_raw(target, body, content_type):
        # Malformed, truncated, binary, huge and deep bodies, under any content type.
        server.unlock()
        server.send(target[0], target[1], body=body, content_type=content_type)

    fuzz_json()
    fuzz_raw()
    print("REQUESTS", server.requests)
    server.assert_still_works()


# -- ids, methods and query parameters --------------------------------------------------------


def test_odd_ids_methods_and_query_parameters_never_get_a_server_error(server, process_ids):
    ids = st.one_of(st.uuids().map(str), st.sampled_from(process_ids), st.sampled_from(ODD_IDS), TEXT).map(
        _path_segment
    )
    keys = st.one_of(st.sampled_from(workflow_keys()), st.sampled_from(ODD_IDS), TEXT).map(_path_segment)
    id_operations = st.sampled_from(ID_OPERATIONS)
    any_operation = st.sampled_from([*ID_OPERATIONS, START, ("GET", "/api/workflows/"), LOCK])
    requests = st.one_of(
        # (operation, path, method): the operation with an odd id or workflow key ...
        st.builds(lambda op, i: (op, op[1].replace("{process_id}", i), op[0]), id_operations, ids),
        st.builds(lambda k: (START, f"/api/processes/{k}", "POST"), keys),
        # ... or with any method: the unsupported ones must be a 405, not an error.
        st.builds(
            lambda op, i, k, m: (op, op[1].replace("{process_id}", i).replace("{workflow_key}", k), m),
            any_operation,
            ids,
            keys,
            METHODS,
        ),
    )

    @fuzz_settings(150)
    @given(request=requests, query=QUERIES)
    def fuzz_paths(request, query):
        server.unlock()
        operation, path, method = request
        server.send(operation, path, method=method, query=query, body=b"[]", content_type="application/json")

    @fuzz_settings(120)
    @given(query=QUERIES)
    def fuzz_process_list(query):
        server.send(("GET", "/api/processes/"), "/api/processes/", query=query)

    fuzz_paths()
    fuzz_process_list()
    print("REQUESTS", server.requests)
    server.assert_still_works()
