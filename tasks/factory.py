"""`create_app(settings)`: stepcache's Celery app, the one way it is built (`tasks.app` is the default one).

The broker is QUEUE_REDIS_URL unless CELERY_BROKER_URL says otherwise; results go to the same Redis
unless CELERY_RESULT_BACKEND does. A `redis+sentinel://` URL becomes kombu's `sentinel://` one with the
master's name in the transport options; a Redis Cluster cannot be the broker (kombu has no cluster
transport), so a `redis+cluster://` QUEUE_REDIS_URL needs CELERY_BROKER_URL. Only JSON crosses the
broker. A message is acknowledged after its task ran (acks_late), and given back when its worker process
died (reject_on_worker_lost); the limiter makes sure a given-back message of a job that already started
does not run twice.

Every queue the graph routes to is declared, so `celery -A tasks worker` consumes them all; `-Q light`
or `-Q heavy` splits them across workers for scaling.
"""

from __future__ import annotations

import os
import sys
from typing import Any
from urllib.parse import quote, urlsplit

from celery import Celery
from kombu.entity import Queue as BrokerQueue

import tasks.signals  # noqa: F401  (connects the signal handlers, once per process)
from common.config import AppConfig, get_config_or_exit, mask_url
from common.exceptions import ConfigError
from common.processing_graph import QueueName, get_processing_graph
from common.redis_connection import CLUSTER_SCHEMES, Topology, parse_redis_url
from tasks.steps import register_tasks


def route_step(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **_: Any) -> dict[str, str]:
    """Each step goes to its graph queue, `light` or `heavy`; other tasks to the default queue."""
    graph = get_processing_graph()
    return {"queue": graph.get_step(name).queue.value} if name in graph else {}


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
    """The Celery configuration of an app running with these settings."""
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
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # The soft limit raises inside the step, which caches JobManagerExceededMaximumDurationError; the
        # hard limit, a grace period later, kills the process and the worker's main process ends the job.
        "task_soft_time_limit": settings.worker.max_job_duration_seconds,
        "task_time_limit": settings.worker.max_job_duration_seconds + settings.worker.hard_limit_grace_seconds,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # The step task stores STARTED itself, once its lease is confirmed: a dropped message changes no state.
        "task_track_started": False,
        "task_queues": [BrokerQueue(name.value) for name in QueueName],  # type: ignore[no-untyped-call]
        "task_default_queue": QueueName.LIGHT.value,
        "task_routes": (route_step,),
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
    }


def create_app(settings: AppConfig | None = None) -> Celery:
    """A Celery app with a task per step of the processing graph (and per step registered later) and
    stepcache's signal handlers; settings default to the environment's (a bad value exits with one line)."""
    app = Celery("stepcache")
    try:
        app.conf.update(celery_settings(settings or get_config_or_exit()))
    except ConfigError as error:
        if settings is not None:
            raise
        print(f"stepcache: {error}", file=sys.stderr)  # the environment's settings: one line, as get_config_or_exit
        raise SystemExit(2) from None
    register_tasks(app)
    app.set_default()  # the app of this process's other threads too (Celery's current app is per thread)
    return app
