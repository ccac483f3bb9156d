"""The dashboard: three pages, and the session login they need when websockets need one.

The views only render templates. Each page loads its data from the REST API and follows the
websockets in the browser (``static/dashboard/dashboard.js``), like any other UI of this API, so
the dashboard shows exactly what the API and the websocket protocol deliver. With
``WS_AUTH_REQUIRED`` on, the pages ask for a logged-in user: the session cookie the login sets is
what then authenticates the page's websockets (``orchestrator_ws.realtime.auth``).
"""

from __future__ import annotations

import uuid
from functools import wraps

from django.conf import settings
from django.contrib.auth import views as auth_views
from django.contrib.auth.views import redirect_to_login
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import path

from processes import selectors


def login_when_websockets_need_it(view):
    """Sends anonymous visitors to the login page when websockets require a session.

    The setting is read per request rather than when the URLs load, so it follows the settings
    in force (tests change it).
    """

    @wraps(view)
    def page(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        if settings.WS_AUTH_REQUIRED and not request.user.is_authenticated:
            return redirect_to_login(request.get_full_path())
        return view(request, *args, **kwargs)

    return page


@login_when_websockets_need_it
def process_list(request: HttpRequest) -> HttpResponse:
    return render(request, "dashboard/process_list.html")


@login_when_websockets_need_it
def process_detail(request: HttpRequest, process_id: uuid.UUID) -> HttpResponse:
    # The page's websocket would only say 4404; an unknown id is better a plain 404 page.
    process = selectors.get_process(process_id)
    if process is None:
        raise Http404(f"process {process_id} not found")
    return render(request, "dashboard/process_detail.html", {"process": process})


@login_when_websockets_need_it
def engine(request: HttpRequest) -> HttpResponse:
    return render(request, "dashboard/engine.html")


urlpatterns = [
    path("", process_list, name="process-list"),
    path("processes/<uuid:process_id>/", process_detail, name="process-detail"),
    path("engine/", engine, name="engine"),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
]
