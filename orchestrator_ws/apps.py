from django.apps import AppConfig


class OrchestratorWsConfig(AppConfig):
    name = "orchestrator_ws"
    verbose_name = "orchestrator-ws"

    def ready(self) -> None:
        from orchestrator_ws import checks  # noqa: F401 - registers the system checks
