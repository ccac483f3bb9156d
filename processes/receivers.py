"""Reactions of the processes app to engine events (connected in ProcessesConfig.ready)."""

from __future__ import annotations

from engine_status.selectors import EngineStatus
from processes.process_data_broadcast import api_broadcast_process_data
from processes.services import resume_stalled_processes


def resume_stalled_on_unlock(sender, *, status: EngineStatus, lock_changed: bool, **kwargs) -> None:
    """Unlocking the engine continues every process the lock paused at a step boundary."""
    if lock_changed and not status.global_lock:
        resume_stalled_processes(api_broadcast_process_data(None))
