"""The engine's singleton settings row: the global lock and the number of running processes."""

from django.db import models


class EngineSettings(models.Model):
    """One row (pk=1) shared by every server process through the database.

    ``running_processes`` counts processes executing on a worker thread right now, across every
    server process; it is only ever changed with atomic ``F()`` updates (see services).
    """

    SINGLETON_PK = 1

    global_lock = models.BooleanField(default=False)
    running_processes = models.IntegerField(default=0)

    class Meta:
        verbose_name = "engine settings"
        verbose_name_plural = "engine settings"

    def __str__(self) -> str:
        return f"lock={self.global_lock} running={self.running_processes}"
