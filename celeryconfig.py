"""Celery's settings for stepcache: what `tasks.app` loads (`app.config_from_object("celeryconfig")`).

Every value comes from stepcache's settings (common/config.py: the environment, or the file
STEPCACHE_CONFIG names), so there is one source of truth and one validation: the broker is
QUEUE_REDIS_URL unless CELERY_BROKER_URL says otherwise, results go to the same Redis unless
CELERY_RESULT_BACKEND does, and the time limits are WORKER_MAX_JOB_DURATION_SECONDS (soft) plus
WORKER_HARD_LIMIT_GRACE_SECONDS (hard). A `redis+sentinel://` URL becomes kombu's `sentinel://` one with
the master's name in the transport options; a Redis Cluster cannot be the broker (kombu has no cluster
transport). Every queue the graph routes to is declared, so `celery -A tasks worker` consumes them all.

Your own settings: a module of yours, named by Celery's usual CELERY_CONFIG_MODULE, that starts with
`from celeryconfig import *` and changes what it wants (`worker_concurrency`, `result_expires`...). What
the limiter relies on (:data:`PROTECTED`: JSON only, a message acknowledged after its task ran and given
back when its worker process died, one message reserved at a time, STARTED stored by the step) cannot be
changed: a process whose configuration changes it stops at start with one line.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import quote, urlsplit

from kombu.entity import Queue as BrokerQueue

from common.config import AppConfig, exit_with, get_config_or_exit, mask_url
from common.exceptions import ConfigError
from common.processing_graph import QueueName
from common.redis_connection import CLUSTER_SCHEMES, Topology, parse_redis_url

# What the limiter relies on, and why; a configuration that changes one of them is refused.
PROTECTED: dict[str, Any] = {
    "task_serializer": "json",  # only JSON crosses the broker
    "result_serializer": "json",
    "accept_content": ["json"],
    "task_acks_late": True,  # acknowledged after the step ran: a crash gives the message back
    "task_reject_on_worker_lost": True,  # ...as does a worker process killed mid-step
    "worker_prefetch_multiplier": 1,  # a worker reserves no message another worker could start now
    "task_track_started": False,  # the step stores STARTED itself, once its lease is confirmed
    # A step's message a worker does not know goes to the step's queue, or its job ends at once: it never
    # holds its namespace's slot (tasks/routing.py, tasks/consumer.py).
    "worker_consumer": "tasks.consumer:StepConsumer",
}


def kombu_url(url: str) -> tuple[str, dict[str, Any]]:
    """Celery's URL, and the transport options it needs, for a Redis URL of ours: `redis+sentinel://
    [[user]:password@]host:port[,host:port]/service[/db]` is kombu's `sentinel://` URL per Sentinel and
    `master_name`; any other URL is Celery's as it is."""
    try:
        target = parse_redis_url(url)
    except ValueError:
        return url, {}  # not Redis (Celery's own result backends, say): Celery's to read
    if target.topology != Topology.SENTINEL:
        return url, {}
    credentials = ""
    if target.password is not None:
        credentials = f"{quote(target.username or '', safe='')}:{quote(target.password, safe='')}@"
    sentinels = ";".join(f"sentinel://{credentials}{host}:{port}/{target.db}" for host, port in target.hosts)
    return sentinels, {"master_name": target.service}


def celery_settings(settings: AppConfig) -> dict[str, Any]:
    """Celery's settings for stepcache's settings (this module's values, for the environment's)."""
    explicit_broker = os.environ.get("CELERY_BROKER_URL")
    broker_url = explicit_broker or settings.queue.redis_url.get_secret_value()
    if urlsplit(broker_url).scheme in CLUSTER_SCHEMES:
        variable = "CELERY_BROKER_URL" if explicit_broker else "QUEUE_REDIS_URL"
        raise ConfigError(
            f"invalid configuration: {variable}={mask_url(broker_url)}: a Redis Cluster cannot be Celery's broker "
            "(kombu has no cluster transport): set CELERY_BROKER_URL to a single or Sentinel-managed Redis"
        )
    broker, broker_options = kombu_url(broker_url)
    backend, backend_options = kombu_url(os.environ.get("CELERY_RESULT_BACKEND") or broker_url)
    visibility_timeout = int(settings.worker.visibility_timeout_seconds)
    return {
        "broker_url": broker,
        "result_backend": backend,
        "result_expires": 24 * 3600,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            "visibility_timeout": visibility_timeout,
            "queue_order_strategy": "priority",
            "priority_steps": [0, 3, 6, 9],
            **broker_options,
        },
        "result_backend_transport_options": {"visibility_timeout": visibility_timeout, **backend_options},
        "event_serializer": "json",
        "result_accept_content": ["json"],
        # The soft limit raises inside the step, which caches JobManagerExceededMaximumDurationError; the
        # hard limit, a grace period later, kills the process and the worker's main process ends the job.
        "task_soft_time_limit": settings.worker.max_job_duration_seconds,
        "task_time_limit": settings.worker.max_job_duration_seconds + settings.worker.hard_limit_grace_seconds,
        "task_queues": [BrokerQueue(name.value) for name in QueueName],  # type: ignore[no-untyped-call]
        "task_default_queue": QueueName.LIGHT.value,
        "task_routes": ("tasks.factory.route_step",),  # each step to its graph queue, `light` or `heavy`
        "worker_send_task_events": True,  # for Flower
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,  # stepcache's logging (COMMON_LOG_LEVEL, COMMON_LOG_FORMAT)
        **PROTECTED,
    }


def _environment_settings() -> dict[str, Any]:
    try:
        return celery_settings(get_config_or_exit())
    except ConfigError as error:
        exit_with(str(error))


_values = _environment_settings()
globals().update(_values)
__all__ = sorted(_values)  # `from celeryconfig import *`: Celery's settings, nothing else
