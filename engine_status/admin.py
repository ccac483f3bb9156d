from django.contrib import admin

from engine_status.models import EngineSettings


@admin.register(EngineSettings)
class EngineSettingsAdmin(admin.ModelAdmin):
    list_display = ("id", "global_lock", "running_processes")
