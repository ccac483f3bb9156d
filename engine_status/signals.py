"""Signals sent by the engine lock, so upper layers can react without this app importing them."""

from django.dispatch import Signal

# Sent after commit whenever global_lock or running_processes changed.
# Keyword arguments: ``status`` (the EngineStatus after the change), ``lock_changed`` (bool).
engine_status_changed = Signal()
