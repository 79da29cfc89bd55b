"""Celery settings of stepcache's app (`celery -A tasks worker` loads them through tasks/__init__.py).

The broker is QUEUE_REDIS_URL unless CELERY_BROKER_URL says otherwise; results go to the same Redis
unless CELERY_RESULT_BACKEND does. Only JSON crosses the broker. A message is acknowledged after its
task ran (acks_late), and given back when its worker process died (reject_on_worker_lost); the limiter
makes sure a given-back message of a job that already started does not run twice.
"""

from __future__ import annotations

import os
from typing import Any

from common.config import get_config_or_exit
from common.processing_graph import QueueName, get_processing_graph

_settings = get_config_or_exit()
_visibility_timeout = int(_settings.worker.visibility_timeout_seconds)

broker_url = os.environ.get("CELERY_BROKER_URL") or _settings.queue.redis_url.get_secret_value()
result_backend = os.environ.get("CELERY_RESULT_BACKEND") or broker_url
result_expires = 24 * 3600
broker_connection_retry_on_startup = True
broker_transport_options = {
    "visibility_timeout": _visibility_timeout,
    "queue_order_strategy": "priority",
    "priority_steps": [0, 3, 6, 9],
}
result_backend_transport_options = {"visibility_timeout": _visibility_timeout}

task_serializer = "json"
result_serializer = "json"
event_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]

# The soft limit raises inside the step, which caches JobManagerExceededMaximumDurationError; the hard
# limit, a grace period later, kills the process and the worker's main process releases the job's slot.
task_soft_time_limit = _settings.worker.max_job_duration_seconds
task_time_limit = _settings.worker.max_job_duration_seconds + _settings.worker.hard_limit_grace_seconds

task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
# The step task stores STARTED itself, once its lease is confirmed: a dropped message changes no state.
task_track_started = False

task_default_queue = QueueName.LIGHT.value
worker_send_task_events = True
task_send_sent_event = True
worker_hijack_root_logger = False


def route_step(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **_: Any) -> dict[str, str]:
    """Each step goes to its graph queue, `light` or `heavy`."""
    graph = get_processing_graph()
    return {"queue": graph.get_step(name).queue.value} if name in graph else {}


task_routes = (route_step,)
