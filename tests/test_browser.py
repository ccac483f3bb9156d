"""The dashboard in a real browser: Debian's Chromium, driven by Playwright, against real daphne.

``./dev test-browser`` runs these (``./dev test`` leaves them out). Playwright only drives the
browser: it launches /usr/bin/chromium, so ``playwright install`` is never needed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.clients import http, post_process
from tests.helpers import wait_until
from tests.servers import PROJECT_DIR, DaphneServer, server_environment

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = PROJECT_DIR / "test-artifacts"
LONG_RUNNING_STEP_COUNT = 7  # Start, five slow steps, Done


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser: Browser):
    """Opens pages, each in a browser context (a window) of its own; a JavaScript error on any
    of them fails the test.

    Not tabs of one window: a background tab gets no animation frames, and Playwright waits for
    those before it clicks.
    """
    contexts = []
    errors: list = []

    def note_error(error):  # Playwright takes Python functions as listeners, not builtins
        errors.append(error)

    def open_page() -> Page:
        context = browser.new_context(viewport={"width": 1280, "height": 860})
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", note_error)
        return page

    yield open_page
    for context in contexts:
        context.close()
    assert not errors, errors


@pytest.fixture
def page(open_page) -> Page:
    return open_page()


@pytest.fixture
def server(database):
    """A server of the test's own. Tests list it before their pages, so that it stops after the
    pages closed: daphne crashes (SIGSEGV) when websockets reconnect while it waits, shutting
    down, for a worker to finish a step."""
    server = DaphneServer(database.url).start()
    yield server
    assert server.stop() == 0, server.log  # 0 again if the test stopped it itself


def expect_connection(page: Page, state: str, timeout: float = 10_000) -> None:
    expect(page.get_by_test_id("connection")).to_have_attribute("data-state", state, timeout=timeout)


def process_row(page: Page, process_id: str):
    return page.locator(f'tr[data-process-id="{process_id}"]')


def wait_for_status(server: DaphneServer, process_id: str, status: str) -> None:
    wait_until(
        lambda: http(server, "GET", f"/api/processes/{process_id}")[1]["last_status"] == status,
        what=f"process {process_id} to be {status}",
    )


def record_changes(page: Page, selector: str, read: str) -> None:
    """Collects in ``window.seen`` each value ``read`` (a JavaScript function of the element)
    takes, so that a state lasting less than a polling interval (PAUSING, say) is seen too."""
    page.evaluate(
        f"""() => {{
            const target = document.querySelector({json.dumps(selector)});
            const read = {read};
            const seen = (window.seen = [read(target)]);
            new MutationObserver(() => {{
                const value = read(target);
                if (seen.at(-1) !== value) seen.push(value);
            }}).observe(target, {{ attributes: true, childList: true, subtree: true }});
        }}"""
    )


def screenshot(page: Page, name: str) -> None:
    path = ARTIFACTS / f"{name}.png"
    ARTIFACTS.mkdir(exist_ok=True)
    path.unlink(missing_ok=True)
    page.screenshot(path=path, full_page=True)
    assert path.stat().st_size > 0


def test_a_process_started_from_the_list_is_followed_live_to_its_end(server, open_page):
    page = open_page()
    # A second page stays on the list from start to end: it must follow without a reload.
    watcher = open_page()
    watcher.goto(server.http + "/")
    watcher.evaluate("window.neverReloaded = true")
    page.goto(server.http + "/")
    expect_connection(page, "live")

    page.locator('[data-workflow="long_running"]').click()
    form = page.get_by_test_id("start-form")
    expect(form.get_by_label("Step Delay")).to_have_value("1")  # the schema's default
    form.get_by_label("Step Delay").fill("0.5")
    form.get_by_role("button", name="Start long_running").click()
    started_link = page.get_by_test_id("started").get_by_role("link")
    process_id = re.fullmatch(r"/processes/([0-9a-f-]{36})/", started_link.get_attribute("href"))[1]

    expect(process_row(page, process_id)).to_have_attribute("data-status", "running")
    expect(process_row(watcher, process_id)).to_have_attribute("data-status", "running")

    process_row(page, process_id).get_by_role("link").click()
    page.wait_for_url(f"**/processes/{process_id}/")
    expect(page.get_by_test_id("timeline-step")).to_have_count(LONG_RUNNING_STEP_COUNT)
    record_changes(
        page, "[data-testid=timeline]", "(timeline) => timeline.querySelectorAll('[data-state=done]').length"
    )
    expect(page.get_by_test_id("stream-ended")).to_have_text(
        "Live updates ended: process completed", timeout=15_000
    )
    expect(page.get_by_test_id("process-status")).to_have_attribute("data-status", "completed")
    done_counts = page.evaluate("window.seen")
    assert done_counts == sorted(set(done_counts)), done_counts
    assert done_counts[-1] == LONG_RUNNING_STEP_COUNT and len(done_counts) >= 3, done_counts
    expect(page.get_by_test_id("abort")).to_be_hidden()
    expect_connection(page, "live")  # an ended stream is not a lost connection
    screenshot(page, "dashboard-detail")

    expect(process_row(watcher, process_id)).to_have_attribute("data-status", "completed")
    assert watcher.evaluate("window.neverReloaded") is True
    screenshot(watcher, "dashboard-list")

    page.goto(server.http + "/engine/")
    engine_status = page.get_by_test_id("engine-global-status")
    expect(engine_status).to_have_attribute("data-status", "RUNNING")
    record_changes(page, "[data-testid=engine-global-status]", "(badge) => badge.dataset.status")
    post_process(server, "long_running", [{"step_delay": 2}])  # a step long enough to watch PAUSING
    expect(page.get_by_test_id("running-processes")).to_have_text("1")
    page.get_by_role("button", name="Lock engine").click()
    expect(engine_status).to_have_attribute("data-status", "PAUSED", timeout=10_000)
    assert page.evaluate("window.seen") == ["RUNNING", "PAUSING", "PAUSED"]
    expect(page.get_by_test_id("engine-status")).to_have_text("Engine PAUSED")
    screenshot(page, "dashboard-engine")

    page.get_by_role("button", name="Unlock engine").click()
    expect(engine_status).to_have_attribute("data-status", "RUNNING")


def test_the_list_recovers_when_the_server_restarts_under_it(server, page, database):
    first = server
    page.goto(first.http + "/")
    expect_connection(page, "live")
    # Raise the list's seq: the restarted server's in-memory layer counts again from 0, so the
    # page's ?since= is ahead of it and the server answers with a resync.
    earlier = [post_process(first, "quick_steps", [{"name": f"before {i}"}]) for i in range(4)]
    for process_id in earlier:
        expect(process_row(page, process_id)).to_have_attribute("data-status", "completed")

    list_loads = []

    def note_list_load(request):
        if "/api/processes/?" in request.url:
            list_loads.append(request.url)

    page.on("request", note_list_load)
    assert first.stop() == 0, first.log
    expect_connection(page, "reconnecting", timeout=3_000)
    expect_connection(page, "stale", timeout=8_000)

    second = DaphneServer(database.url, port=first.port).start()
    try:
        process_id = post_process(second, "confirm_input", [{}])
        expect(process_row(page, process_id)).to_have_attribute("data-status", "suspended", timeout=20_000)
        expect_connection(page, "live")
        assert list_loads, "the page did not reload the list after the resync"
        expect(page.locator("tr[data-process-id]")).to_have_count(5)
        expect(page.get_by_test_id("engine-status")).to_have_text("Engine RUNNING")
    finally:
        assert second.stop() == 0, second.log


def test_a_suspended_process_is_resumed_from_its_detail_page(server, page):
    process_id = post_process(server, "confirm_input", [{}])
    wait_for_status(server, process_id, "suspended")

    page.goto(f"{server.http}/processes/{process_id}/")
    expect(page.get_by_test_id("process-status")).to_have_attribute("data-status", "suspended")
    current = page.locator("[data-testid=timeline-step][data-state=current]")
    expect(current).to_contain_text("Confirm change")
    form = page.get_by_test_id("resume-form")
    approved = form.get_by_label("Approved")
    expect(approved).not_to_be_checked()
    approved.check()
    form.get_by_label("Comment").fill("looks good")
    form.get_by_role("button", name="Resume").click()

    expect(page.get_by_test_id("stream-ended")).to_have_text("Live updates ended: process completed")
    expect(page.get_by_test_id("process-status")).to_have_attribute("data-status", "completed")
    expect(page.locator("[data-testid=timeline-step]:not([data-state=done])")).to_have_count(0)
    expect(form).to_be_hidden()
    state = http(server, "GET", f"/api/processes/{process_id}")[1]["current_state"]
    assert state["approved"] is True and state["comment"] == "looks good"


def test_a_running_process_is_aborted_then_deleted_from_its_detail_page(server, open_page):
    watcher = open_page()
    watcher.goto(server.http + "/")
    expect_connection(watcher, "live")
    process_id = post_process(server, "long_running", [{"step_delay": 2}])
    page = open_page()
    page.goto(f"{server.http}/processes/{process_id}/")
    expect(page.get_by_test_id("process-status")).to_have_attribute("data-status", "running")

    page.get_by_test_id("abort").click()
    expect(page.get_by_test_id("stream-ended")).to_have_text("Live updates ended: process aborted")
    expect(page.get_by_test_id("process-status")).to_have_attribute("data-status", "aborted")
    expect(page.get_by_test_id("abort")).to_be_hidden()
    expect(process_row(watcher, process_id)).to_have_attribute("data-status", "aborted")

    dialogs = []

    def accept(dialog):
        dialogs.append(dialog.message)
        dialog.accept()

    page.on("dialog", accept)
    page.get_by_test_id("delete").click()
    page.wait_for_url(server.http + "/")
    assert dialogs == ["Delete this process and all its steps?"]
    expect(process_row(page, process_id)).to_have_count(0)
    expect(process_row(watcher, process_id)).to_have_count(0)  # removed live from the other page
    assert http(server, "GET", f"/api/processes/{process_id}")[0] == 404


def test_with_auth_required_the_list_needs_a_login_and_its_websockets_the_session(page, database):
    create_user = (
        "from django.contrib.auth.models import User; User.objects.create_user('ada', password='s3cret pass')"
    )
    subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", create_user],
        cwd=PROJECT_DIR,
        env=server_environment(database.url),
        check=True,
    )
    server = DaphneServer(database.url, WS_AUTH_REQUIRED="1").start()
    try:
        page.goto(server.http + "/")
        expect(page).to_have_url(f"{server.http}/accounts/login/?next=/")
        page.get_by_label("Username").fill("ada")
        page.get_by_label("Password").fill("s3cret pass")
        page.get_by_role("button", name="Log in").click()
        expect(page).to_have_url(f"{server.http}/")
        expect_connection(page, "live")

        process_id = post_process(server, "quick_steps", [{"name": "signed in"}])
        expect(process_row(page, process_id)).to_have_attribute("data-status", "completed")
        expect(page.get_by_test_id("engine-status")).to_have_text("Engine RUNNING")
    finally:
        assert server.stop() == 0, server.log
