"""Prometheus metrics of the real-time layer (served at /metrics, per server process).

Groups are labelled by kind (``process-detail``, not ``process-detail.<id>``) to keep the
number of series bounded.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram


def group_kind(group: str) -> str:
    return group.split(".", 1)[0]


OPEN_CONNECTIONS = Gauge(
    "orchestrator_ws_open_connections", "Open websocket connections by group kind", ["group"]
)
CONNECTIONS_REFUSED = Counter(
    "orchestrator_ws_connections_refused_total",
    "Websocket connections refused or closed for a reason",
    ["reason"],
)
MESSAGES_BROADCAST = Counter(
    "orchestrator_ws_messages_broadcast_total", "Group messages sent by this server", ["group"]
)
MESSAGES_FANNED_OUT = Counter(
    "orchestrator_ws_messages_fanned_out_total",
    "Group messages handed to local connections (one per connection per message)",
    ["group"],
)
RESYNCS = Counter("orchestrator_ws_resyncs_total", "Resync frames sent to clients", ["group"])
GAPS_REPAIRED = Counter(
    "orchestrator_ws_gaps_repaired_total",
    "Out-of-sequence messages a consumer noticed and caught up on",
    ["group"],
)
SLOW_CLIENTS_CLOSED = Counter(
    "orchestrator_ws_slow_clients_closed_total", "Clients closed with 1013 for not reading"
)
BROADCAST_DROPPED = Counter(
    "orchestrator_ws_broadcast_dropped_total", "Updates dropped from the full broadcast queue"
)
BROADCAST_SEND_FAILURES = Counter(
    "orchestrator_ws_broadcast_send_failures_total", "Batches the broadcast thread failed to send"
)
BROADCAST_QUEUE_DEPTH = Gauge(
    "orchestrator_ws_broadcast_queue_depth", "Updates waiting for the broadcast thread"
)
ENQUEUE_TO_SEND_SECONDS = Histogram(
    "orchestrator_ws_enqueue_to_send_seconds",
    "From a worker's enqueue to the group message being sent",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
REDIS_RECONNECTS = Counter(
    "orchestrator_ws_redis_reconnects_total", "Times the Redis subscription was restored"
)
