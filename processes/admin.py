from django.contrib import admin

from processes.models import Process, ProcessStep


class ProcessStepInline(admin.TabularInline):
    model = ProcessStep
    fields = ("name", "status", "created_by", "executed_at", "state_delta")
    readonly_fields = fields
    extra = 0
    can_delete = False


@admin.register(Process)
class ProcessAdmin(admin.ModelAdmin):
    list_display = ("process_id", "workflow_name", "last_status", "last_step", "assignee", "started_at")
    list_filter = ("last_status", "workflow_name", "assignee", "is_task")
    search_fields = ("process_id", "workflow_name", "created_by")
    readonly_fields = ("process_id", "run_claim")
    inlines = [ProcessStepInline]


@admin.register(ProcessStep)
class ProcessStepAdmin(admin.ModelAdmin):
    list_display = ("name", "status", "process", "executed_at")
    list_filter = ("status",)
