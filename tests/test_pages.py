"""The dashboard's pages and static files through Django's test clients (no browser).

What the pages do in a browser is tests/test_browser.py's job; here: they render, their login
applies only when websockets need one, and WhiteNoise serves the module under WSGI and ASGI.
"""

from __future__ import annotations

import uuid

import pytest
from django.contrib.auth.models import User
from django.test import AsyncClient, Client

from processes.models import Process

pytestmark = pytest.mark.django_db

PAGE_PATHS = ["/", "/engine/", "/processes/{process_id}/"]


@pytest.fixture(params=[True, False], ids=["debug", "no-debug"])
def debug(request, settings):
    settings.DEBUG = request.param
    return request.param


@pytest.fixture
def client():
    return Client(HTTP_HOST="localhost")


@pytest.fixture
def process():
    return Process.objects.create(workflow_name="confirm_input", last_status="suspended")


@pytest.mark.parametrize("path", PAGE_PATHS)
def test_pages_render_without_login_when_websockets_need_none(client, debug, process, path):
    response = client.get(path.format(process_id=process.process_id))
    assert response.status_code == 200
    html = response.content.decode()
    assert "/static/dashboard/dashboard.js" in html
    assert 'data-testid="connection"' in html


def test_the_detail_page_names_its_process(client, process):
    html = client.get(f"/processes/{process.process_id}/").content.decode()
    assert f'data-process-id="{process.process_id}"' in html
    assert "<h1>confirm_input</h1>" in html


def test_the_detail_page_of_an_unknown_process_is_a_404(client, debug):
    assert client.get(f"/processes/{uuid.uuid4()}/").status_code == 404


@pytest.mark.parametrize("path", PAGE_PATHS)
def test_pages_send_anonymous_visitors_to_the_login_when_websockets_need_a_session(
    client, settings, process, path
):
    settings.WS_AUTH_REQUIRED = True
    path = path.format(process_id=process.process_id)
    response = client.get(path)
    assert response.status_code == 302
    assert response["Location"] == f"/accounts/login/?next={path}"


def test_logging_in_leads_to_the_page_asked_for(client, settings, debug):
    settings.WS_AUTH_REQUIRED = True
    User.objects.create_user("ada", password="correct horse battery")
    login_page = client.get("/accounts/login/?next=/engine/")
    assert login_page.status_code == 200
    assert b"dashboard.js" not in login_page.content  # no websockets before the login

    response = client.post(
        "/accounts/login/", {"username": "ada", "password": "correct horse battery", "next": "/engine/"}
    )
    assert response.status_code == 302
    assert response["Location"] == "/engine/"
    page = client.get("/engine/")
    assert page.status_code == 200
    assert b"ada" in page.content


def test_the_login_goes_to_the_process_list_by_default(client, settings):
    settings.WS_AUTH_REQUIRED = True
    User.objects.create_user("ada", password="correct horse battery")
    response = client.post("/accounts/login/", {"username": "ada", "password": "correct horse battery"})
    assert response["Location"] == "/"


def test_logging_out_leads_back_to_the_login(client, settings):
    settings.WS_AUTH_REQUIRED = True
    client.force_login(User.objects.create_user("ada"))
    response = client.post("/accounts/logout/")
    assert response["Location"] == "/accounts/login/"
    assert client.get("/")["Location"] == "/accounts/login/?next=/"


@pytest.mark.parametrize("name", ["dashboard.js", "dashboard.css"])
def test_whitenoise_serves_the_static_files_under_wsgi(client, debug, name):
    response = client.get(f"/static/dashboard/{name}")
    assert response.status_code == 200
    expected_type = "text/javascript" if name.endswith(".js") else "text/css"
    assert response["Content-Type"].startswith(expected_type)
    assert b"".join(response.streaming_content)


async def test_whitenoise_serves_the_module_under_asgi(debug):
    response = await AsyncClient(HTTP_HOST="localhost").get("/static/dashboard/dashboard.js")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/javascript")
    assert b"class LiveSocket" in b"".join(response.streaming_content)
