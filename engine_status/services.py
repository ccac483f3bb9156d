"""The engine lock: pausing the engine and counting the processes that are executing.

All changes are single atomic UPDATE statements on the singleton row, so worker threads and
several server processes can change the count at once without losing an increment. Each change
sends :data:`engine_status.signals.engine_status_changed` after its transaction commits.
"""

from __future__ import annotations

from django.db import transaction
from django.db.models import F

from engine_status.models import EngineSettings
from engine_status.selectors import EngineStatus, engine_settings, get_engine_status
from engine_status.signals import engine_status_changed


def _update(**changes) -> None:
    rows = EngineSettings.objects.filter(pk=EngineSettings.SINGLETON_PK)
    if rows.update(**changes) == 0:
        engine_settings()
        rows.update(**changes)


def _announce(*, lock_changed: bool) -> None:
    def send() -> None:
        engine_status_changed.send(
            sender=EngineSettings, status=get_engine_status(), lock_changed=lock_changed
        )

    transaction.on_commit(send)


def set_global_lock(locked: bool) -> EngineStatus:
    """Lock (pause) or unlock the engine; returns the status after the change."""
    with transaction.atomic():
        engine_settings()
        row = EngineSettings.objects.select_for_update().get(pk=EngineSettings.SINGLETON_PK)
        if row.global_lock != locked:
            row.global_lock = locked
            row.save(update_fields=["global_lock"])
            _announce(lock_changed=True)
    return get_engine_status()


def run_started() -> None:
    """A worker thread began executing a process."""
    with transaction.atomic():
        _update(running_processes=F("running_processes") + 1)
        _announce(lock_changed=False)


def run_finished() -> None:
    """A worker thread stopped executing a process (completed, suspended, failed or paused)."""
    with transaction.atomic():
        _update(running_processes=F("running_processes") - 1)
        _announce(lock_changed=False)
