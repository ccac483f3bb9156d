from importlib import import_module

from django.apps import AppConfig
from django.conf import settings


class ProcessesConfig(AppConfig):
    name = "processes"

    def ready(self) -> None:
        from engine_status.signals import engine_status_changed
        from processes.process_data_broadcast import broadcast_engine_status
        from processes.receivers import resume_stalled_on_unlock

        for module in settings.WORKFLOW_MODULES:
            import_module(module)
        engine_status_changed.connect(resume_stalled_on_unlock, dispatch_uid="resume-stalled-on-unlock")
        engine_status_changed.connect(broadcast_engine_status, dispatch_uid="broadcast-engine-status")
