"""The message builders: one JSON shape whichever way a frame is built."""

from __future__ import annotations

import json

import pytest

from orchestrator_ws.realtime.protocol import encode
from processes import messages, selectors, services
from processes.engine import no_broadcast
from processes.models import Process
from tests.helpers import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.parametrize("status", ["running", "suspended", "completed", "failed", "aborted"])
@pytest.mark.parametrize("with_step", [True, False])
def test_detail_update_around_an_encoded_detail_is_the_detail_frame(status, with_step):
    process_id = services.start_process("quick_steps", [], created_by="t", broadcast=no_broadcast)
    wait_until(lambda: Process.objects.get(pk=process_id).last_status == "completed")
    process, steps = selectors.processes_with_steps([process_id])[process_id]
    detail = messages.process_detail(process, steps)
    step = messages.process_step(steps[2]) if with_step else None

    fast = messages.process_detail_update(encode(detail), step, status)
    canonical = messages.group_message(messages.process_detail_frame(detail, step, status))
    assert json.loads(fast["text"]) == json.loads(canonical["text"])
    assert list(json.loads(fast["text"])) == list(json.loads(canonical["text"]))  # key order too
    assert (
        fast.get("close")
        == canonical.get("close")
        == (True if status not in {"running", "suspended"} else None)
    )
