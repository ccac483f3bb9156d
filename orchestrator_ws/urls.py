from django.contrib import admin
from django.urls import include, path

from orchestrator_ws import operability, pages
from orchestrator_ws.api import api

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/", api.urls),
    path("health/", operability.health, name="health"),
    path("ready/", operability.ready, name="ready"),
    path("metrics", operability.metrics, name="metrics"),
    path("", include(pages)),
]
