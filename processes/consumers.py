"""The four websocket endpoints (orchestrator-core's paths); the shared work is in GroupConsumer."""

from __future__ import annotations

from channels.db import database_sync_to_async

from engine_status.selectors import get_engine_status
from orchestrator_ws.realtime.consumers import ConnectRefused, GroupConsumer
from orchestrator_ws.realtime.protocol import CLOSE_NOT_FOUND, Frame, error_frame
from processes import messages, selectors


class ProcessListConsumer(GroupConsumer):
    """``/api/processes/all/``: a summary of every process that changes (the list loads over HTTP)."""

    def group_name(self) -> str:
        return messages.PROCESS_LIST_GROUP


class ProcessDetailConsumer(GroupConsumer):
    """``/api/processes/{id}``: the process's detail now, then at every step, while it is active."""

    def group_name(self) -> str:
        return messages.process_detail_group(self.scope["url_route"]["kwargs"]["process_id"])

    async def snapshot(self) -> Frame:
        process_id = self.scope["url_route"]["kwargs"]["process_id"]
        detail = await database_sync_to_async(selectors.get_process_detail)(process_id)
        if detail is None and self.synced:
            # A client re-syncing after its process was deleted gets what the live stream
            # says of a deletion, not the 404 an id that never existed gets.
            return messages.process_detail_frame(messages.deleted_process(process_id))
        if detail is None:
            raise ConnectRefused(
                error_frame(404, f"process {process_id} not found", title="Not Found"), CLOSE_NOT_FOUND
            )
        return messages.process_detail_frame(detail)


class EngineStatusConsumer(GroupConsumer):
    """``/api/settings/ws-status/``: the engine status now and whenever it changes."""

    def group_name(self) -> str:
        return messages.ENGINE_STATUS_GROUP

    async def snapshot(self) -> Frame:
        return messages.engine_status_frame(await database_sync_to_async(get_engine_status)())


class EventsConsumer(GroupConsumer):
    """``/api/ws/events``: the v2 UI's cache invalidations; its token comes as a subprotocol."""

    token_in = "subprotocol"

    def group_name(self) -> str:
        return messages.EVENTS_GROUP
