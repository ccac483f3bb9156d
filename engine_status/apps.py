from django.apps import AppConfig


class EngineStatusConfig(AppConfig):
    name = "engine_status"
    verbose_name = "Engine status"
