"""Service discovery: each API process's record in the registry (common/registry.py), and
`GET /discovery/prometheus`, every live metrics endpoint in Prometheus' HTTP service discovery format,
so that one `http_sd_configs` entry scrapes the whole fleet:

    [{"targets": ["host:9808"], "labels": {"job": "stepcache-worker", "role": "worker", "host": "...",
      "node": "light@host", "__meta_stepcache_pid": "12", "__meta_stepcache_version": "0.1.0", ...}}]

One target per metrics endpoint: the API processes of one `python -m tasks api --workers N` share theirs
(the parent process serves their sum), so their pids are listed together. The route names hosts, so it is
the operator's (tasks.api.auth: `Authorization: Bearer <API_OPERATOR_KEY>`, what Prometheus'
`authorization` sends). `python -m tasks api` tells its processes the URL of the metrics it serves in
STEPCACHE_API_METRICS_URL; an app served otherwise registers with no metrics URL.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from datetime import UTC, datetime
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from common.registry import ProcessRecord, Registration, Role, get_registry, this_process
from tasks.api.auth import require_operator
from tasks.api.operator import AUTH

METRICS_URL_ENV = "STEPCACHE_API_METRICS_URL"


class TargetGroup(BaseModel):
    """One entry of Prometheus' HTTP service discovery: targets (host:port) and their labels."""

    targets: list[str]
    labels: dict[str, str]


def api_registration() -> Registration:
    """This API process's registration (started by the app's lifespan)."""
    started_at = datetime.now(UTC)
    metrics_url = os.environ.get(METRICS_URL_ENV) or None
    return Registration(lambda: this_process(Role.API, started_at, metrics_url=metrics_url))


def prometheus_targets(records: Iterable[ProcessRecord]) -> list[TargetGroup]:
    """A target group per metrics endpoint of these processes, by address."""
    by_address: dict[str, list[ProcessRecord]] = {}
    for record in records:
        if record.metrics_url:
            by_address.setdefault(urlsplit(record.metrics_url).netloc, []).append(record)
    groups = []
    for address, sharing in sorted(by_address.items()):
        first = sharing[0]
        labels = {"job": f"stepcache-{first.role}", "role": first.role, "host": first.host}
        if first.node:
            labels["node"] = first.node
        path = urlsplit(first.metrics_url or "").path
        if path not in ("", "/metrics"):
            labels["__metrics_path__"] = path
        labels |= {
            "__meta_stepcache_pid": ",".join(str(record.pid) for record in sharing),
            "__meta_stepcache_version": first.version,
            "__meta_stepcache_started_at": min(record.started_at for record in sharing).isoformat(),
            "__meta_stepcache_queues": ",".join(first.queues),
            "__meta_stepcache_concurrency": "" if first.concurrency is None else str(first.concurrency),
        }
        groups.append(TargetGroup(targets=[address], labels=labels))
    return groups


def router() -> APIRouter:
    discovery = APIRouter(
        prefix="/discovery", tags=["operator"], dependencies=[Depends(require_operator)], responses=AUTH
    )

    @discovery.get("/prometheus", response_model=list[TargetGroup])
    def prometheus() -> list[TargetGroup]:
        """Every live metrics endpoint of the fleet, for Prometheus' `http_sd_configs`."""
        return prometheus_targets(get_registry().live())

    return discovery
