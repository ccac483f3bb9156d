"""Reads of the engine status."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from django.db import connection

from engine_status.models import EngineSettings


class GlobalStatus(StrEnum):
    RUNNING = "RUNNING"
    PAUSING = "PAUSING"
    PAUSED = "PAUSED"


@dataclass(frozen=True)
class EngineStatus:
    global_lock: bool
    running_processes: int

    @property
    def global_status(self) -> GlobalStatus:
        """RUNNING when unlocked; once locked, PAUSING until the last running process has stopped."""
        if not self.global_lock:
            return GlobalStatus.RUNNING
        return GlobalStatus.PAUSING if self.running_processes > 0 else GlobalStatus.PAUSED

    def as_dict(self) -> dict:
        """The JSON shape shared by the REST API and the engine-status websocket."""
        return {
            "global_lock": self.global_lock,
            "running_processes": self.running_processes,
            "global_status": self.global_status.value,
        }


def engine_settings() -> EngineSettings:
    """The singleton row, created on first use (tests that flush tables remove it)."""
    settings, _ = EngineSettings.objects.get_or_create(pk=EngineSettings.SINGLETON_PK)
    return settings


def get_engine_status() -> EngineStatus:
    row = engine_settings()
    return EngineStatus(global_lock=row.global_lock, running_processes=row.running_processes)


def is_locked() -> bool:
    """Asked at every step boundary: one indexed read; the row is created only when missing.

    The read is one plain SQL statement: the ORM spent about 0.2 ms building the query each
    time, a sixth of a short step's CPU, on the thread that runs the step.
    """
    quote = connection.ops.quote_name
    meta = EngineSettings._meta
    sql = (
        f"SELECT {quote(meta.get_field('global_lock').column)} FROM {quote(meta.db_table)} "
        f"WHERE {quote(meta.pk.column)} = %s"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [EngineSettings.SINGLETON_PK])
        row = cursor.fetchone()
    return engine_settings().global_lock if row is None else bool(row[0])
