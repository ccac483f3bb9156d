"""The REST API end to end through Django: every endpoint, its errors, and each status transition."""

from __future__ import annotations

import json
import uuid

import pytest
from django.db import OperationalError

from processes import services
from processes.models import Process, ProcessStep
from tests.helpers import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def post_json(client, path, body, method="post"):
    return getattr(client, method)(path, data=json.dumps(body), content_type="application/json")


def start(client, workflow, inputs=None):
    response = post_json(client, f"/api/processes/{workflow}", inputs if inputs is not None else [])
    assert response.status_code == 201, response.content
    return response.json()["id"]


def detail(client, process_id):
    response = client.get(f"/api/processes/{process_id}")
    assert response.status_code == 200, response.content
    return response.json()


def wait_for_status(client, process_id, status, timeout=10):
    return wait_until(
        lambda: (d := detail(client, process_id))["last_status"] == status and d,
        timeout=timeout,
        what=f"process {process_id} to be {status}",
    )


def step_rows(process):
    return [(s["name"], s["status"]) for s in process["steps"]]


def test_workflows_lists_the_demo_workflows_with_their_forms(api_client):
    response = api_client.get("/api/workflows/")
    assert response.status_code == 200
    workflows = {wf["name"]: wf for wf in response.json()}
    assert {"quick_steps", "long_running", "confirm_input", "flaky_retry"} <= set(workflows)
    long_running = workflows["long_running"]
    assert long_running["is_task"] is True
    assert long_running["target"] == "SYSTEM"
    assert long_running["form"]["properties"]["step_delay"]["maximum"] == 60
    assert workflows["quick_steps"]["steps"] == ["Prepare", "Compute", "Verify", "Done"]


def test_quick_workflow_runs_to_completion_with_merged_state(api_client):
    process_id = start(api_client, "quick_steps", [{"name": "ops"}])
    process = wait_for_status(api_client, process_id, "completed")
    assert step_rows(process) == [
        ("Start", "success"),
        ("Prepare", "success"),
        ("Compute", "success"),
        ("Verify", "success"),
        ("Done", "complete"),
    ]
    assert process["current_state"] == {
        "name": "ops",
        "greeting": "hello ops",
        "length": 9,
        "verified": True,
    }
    assert process["steps"][2]["state_delta"] == {"length": 9}
    assert process["id"] == process["process_id"] == process_id
    assert process["status"] == "completed" and process["step"] == "Done"
    assert process["workflow_target"] == "CREATE"
    assert process["created_by"] == "anonymous"


def test_new_process_reports_pending_steps(api_client):
    process_id = start(api_client, "long_running", [{"step_delay": 0.5}])
    process = wait_for_status(api_client, process_id, "running")
    names = [s["name"] for s in process["steps"]]
    assert names[0] == "Start"
    pending = [s["name"] for s in process["steps"] if s["status"] == "pending"]
    assert pending[-1] == "Done" and len(pending) >= 5
    assert (
        names
        == ["Start"] + [f"Slow step {i}" for i in range(1, 6)][: len(names) - 1 - len(pending)] + pending
    )


def test_suspend_then_resume_with_input_completes(api_client):
    process_id = start(api_client, "confirm_input")
    process = wait_for_status(api_client, process_id, "suspended")
    assert step_rows(process)[-3:] == [
        ("Confirm change", "suspend"),
        ("Apply change", "pending"),
        ("Done", "pending"),
    ]
    assert process["assignee"] == "CHANGES"

    bad = post_json(api_client, f"/api/processes/{process_id}/resume", [{"approved": "maybe"}], "put")
    assert bad.status_code == 400
    assert bad.json()["errors"][0]["field"] == "approved"
    unknown_field = post_json(
        api_client, f"/api/processes/{process_id}/resume", [{"approved": True, "extra": 1}], "put"
    )
    assert unknown_field.status_code == 400
    assert detail(api_client, process_id)["last_status"] == "suspended"

    ok = post_json(api_client, f"/api/processes/{process_id}/resume", [{"approved": True}], "put")
    assert ok.status_code == 204
    process = wait_for_status(api_client, process_id, "completed")
    assert step_rows(process)[2:] == [
        ("Confirm change", "suspend"),
        ("Confirm change", "success"),
        ("Apply change", "success"),
        ("Done", "complete"),
    ]
    assert process["current_state"]["applied"] == "replace line card"
    assert process["steps"][3]["state_delta"] == {"approved": True, "comment": ""}


def test_failed_step_is_retried_by_resume(api_client):
    process_id = start(api_client, "flaky_retry")
    process = wait_for_status(api_client, process_id, "failed")
    assert process["failed_reason"].startswith("FlakyApiError: the inventory API timed out")
    assert step_rows(process)[-2:] == [("Call flaky API", "failed"), ("Done", "pending")]
    assert "Traceback" in Process.objects.get(pk=process_id).traceback

    assert post_json(api_client, f"/api/processes/{process_id}/resume", [{}], "put").status_code == 204
    process = wait_for_status(api_client, process_id, "completed")
    assert process["current_state"]["api_attempts"] == 2
    assert process["failed_reason"] is None


@pytest.mark.parametrize(
    "workflow, expected_status",
    [("quick_steps", "completed"), ("confirm_input", "suspended"), ("flaky_retry", "failed")],
)
def test_resume_refused_unless_resumable(api_client, workflow, expected_status):
    process_id = start(api_client, workflow)
    wait_for_status(api_client, process_id, expected_status)
    response = post_json(api_client, f"/api/processes/{process_id}/resume", [{"approved": True}], "put")
    if expected_status == "completed":
        assert response.status_code == 409
        assert "completed" in response.json()["detail"]
    else:
        assert response.status_code == 204


def test_resume_of_running_and_aborted_processes_conflicts(api_client):
    process_id = start(api_client, "long_running", [{"step_delay": 0.3}])
    wait_for_status(api_client, process_id, "running")
    assert post_json(api_client, f"/api/processes/{process_id}/resume", [], "put").status_code == 409
    assert api_client.put(f"/api/processes/{process_id}/abort").status_code == 204
    assert post_json(api_client, f"/api/processes/{process_id}/resume", [], "put").status_code == 409


def test_abort_running_process_stops_it_at_the_step(api_client):
    process_id = start(api_client, "long_running", [{"step_delay": 0.3}])
    wait_for_status(api_client, process_id, "running")
    assert api_client.put(f"/api/processes/{process_id}/abort").status_code == 204
    process = detail(api_client, process_id)
    assert process["last_status"] == "aborted"
    assert step_rows(process)[-1] == ("Abort", "abort")
    # The step that was executing finishes, notices the abort and logs nothing after it.
    wait_until(lambda: Process.objects.get(pk=process_id).run_claim is None, what="run to stop")
    process = detail(api_client, process_id)
    assert process["last_status"] == "aborted"
    assert step_rows(process)[-1] == ("Abort", "abort")
    assert api_client.put(f"/api/processes/{process_id}/abort").status_code == 409


def test_abort_suspended_process(api_client):
    process_id = start(api_client, "confirm_input")
    wait_for_status(api_client, process_id, "suspended")
    assert api_client.put(f"/api/processes/{process_id}/abort").status_code == 204
    assert detail(api_client, process_id)["last_status"] == "aborted"


def test_delete_removes_process_and_steps(api_client):
    process_id = start(api_client, "quick_steps")
    wait_for_status(api_client, process_id, "completed")
    assert api_client.delete(f"/api/processes/{process_id}").status_code == 204
    assert api_client.get(f"/api/processes/{process_id}").status_code == 404
    assert not ProcessStep.objects.filter(process_id=process_id).exists()
    assert api_client.delete(f"/api/processes/{process_id}").status_code == 404


def test_delete_of_running_process_stops_its_run(api_client):
    process_id = start(api_client, "long_running", [{"step_delay": 0.2}])
    wait_for_status(api_client, process_id, "running")
    assert api_client.delete(f"/api/processes/{process_id}").status_code == 204
    wait_until(lambda: api_client.get("/api/settings/status").json()["running_processes"] == 0)
    assert not Process.objects.filter(pk=process_id).exists()
    assert not ProcessStep.objects.filter(process_id=process_id).exists()


def test_list_filters_and_paginates(api_client):
    done_ids = [start(api_client, "quick_steps") for _ in range(3)]
    suspended_id = start(api_client, "confirm_input")
    for process_id in done_ids:
        wait_for_status(api_client, process_id, "completed")
    wait_for_status(api_client, suspended_id, "suspended")

    everything = api_client.get("/api/processes/").json()
    assert everything["count"] == 4
    assert everything["items"][0]["process_id"] == suspended_id  # newest first
    completed = api_client.get("/api/processes/?status=completed").json()
    assert {p["id"] for p in completed["items"]} == set(done_ids)
    by_workflow = api_client.get("/api/processes/?workflow=confirm_input").json()
    assert [p["id"] for p in by_workflow["items"]] == [suspended_id]
    page = api_client.get("/api/processes/?limit=2&offset=1").json()
    assert page["count"] == 4 and len(page["items"]) == 2


@pytest.mark.parametrize(
    "query", ["status=bogus", "limit=-1", "limit=abc", "offset=-5", f"workflow={'x' * 300}"]
)
def test_list_rejects_bad_filters(api_client, query):
    response = api_client.get(f"/api/processes/?{query}")
    assert response.status_code == 400, response.content
    assert response.json()["detail"]


@pytest.mark.parametrize(
    "body, field",
    [
        ("{", None),
        ('{"name": "x"}', "body.user_inputs"),
        ("[1, 2]", "body.user_inputs.0"),
        ('[{"name": ""}]', "name"),
        ('[{"name": 5}]', "name"),
        ('[{"unknown": true}]', "unknown"),
    ],
)
def test_start_rejects_bad_input(api_client, body, field):
    response = api_client.post("/api/processes/quick_steps", data=body, content_type="application/json")
    assert response.status_code == 400, response.content
    payload = response.json()
    assert payload["detail"]
    if field:
        assert field in [error["field"] for error in payload["errors"]]
    assert Process.objects.count() == 0


def test_start_of_unknown_workflow_is_404(api_client):
    response = post_json(api_client, "/api/processes/no_such_workflow", [])
    assert response.status_code == 404
    assert "no_such_workflow" in response.json()["detail"]


@pytest.mark.parametrize(
    "method, suffix", [("get", ""), ("delete", ""), ("put", "/resume"), ("put", "/abort")]
)
def test_non_uuid_and_unknown_ids(api_client, method, suffix):
    not_uuid = getattr(api_client, method)(f"/api/processes/not-a-uuid{suffix}")
    assert not_uuid.status_code == 400
    assert "UUID" in json.dumps(not_uuid.json())
    unknown = getattr(api_client, method)(f"/api/processes/{uuid.uuid4()}{suffix}")
    assert unknown.status_code == 404
    assert "not found" in unknown.json()["detail"]


def test_openapi_schema_describes_every_endpoint(api_client):
    schema = api_client.get("/api/openapi.json").json()
    paths = schema["paths"]
    assert set(paths) >= {
        "/api/workflows/",
        "/api/processes/",
        "/api/processes/{process_id}",
        "/api/processes/{workflow_key}",
        "/api/processes/{process_id}/resume",
        "/api/processes/{process_id}/abort",
        "/api/settings/status",
    }
    assert set(paths["/api/processes/{process_id}"]) == {"get", "delete"}
    assert set(paths["/api/processes/{workflow_key}"]) == {"post"}
    assert api_client.get("/api/docs").status_code == 200


def test_resume_form_of_a_suspended_input_step(api_client):
    process_id = start(api_client, "confirm_input")
    wait_for_status(api_client, process_id, "suspended")
    form = api_client.get(f"/api/processes/{process_id}/resume-form").json()["form"]
    assert form["required"] == ["approved"] and form["properties"]["approved"]["type"] == "boolean"
    done_id = start(api_client, "quick_steps")
    wait_for_status(api_client, done_id, "completed")
    assert api_client.get(f"/api/processes/{done_id}/resume-form").json() == {"form": None}
    assert api_client.get(f"/api/processes/{uuid.uuid4()}/resume-form").status_code == 404


def test_a_database_that_refuses_connections_is_a_503_and_leaves_nothing_half_done(api_client, monkeypatch):
    """PostgreSQL answers "too many clients" when its max_connections are taken."""
    refused = OperationalError(
        'connection failed: connection to server at "127.0.0.1", port 5432 failed: '
        "FATAL:  sorry, too many clients already"
    )

    def refuse(*args, **kwargs):
        raise refused

    monkeypatch.setattr(services, "record_step", refuse)  # inside the start's transaction
    response = post_json(api_client, "/api/processes/quick_steps", [])
    assert response.status_code == 503, response.content
    assert response.json()["detail"] == f"database unavailable, retry: {refused}"
    assert response["Retry-After"] == "1"
    assert Process.objects.count() == 0  # the process row was rolled back with it

    monkeypatch.setattr(services, "existing_process", refuse)
    response = api_client.get(f"/api/processes/{uuid.uuid4()}")
    assert response.status_code == 503
    monkeypatch.undo()
    start(api_client, "quick_steps")  # and it serves again once the database does
