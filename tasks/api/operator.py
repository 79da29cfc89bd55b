"""Operator endpoints, under /admin, for the operator's key or a signed request (tasks.api.auth):

- `POST /admin/refresh?dataset=&priority=`: compute the dataset again from its first step, whatever the
  cache holds (its children follow as each step succeeds);
- `POST /admin/cancel?dataset=&revoke=`: cancel its waiting and queued jobs, and its running ones with
  `revoke=true`;
- `GET /admin/limits`: the default limit and every namespace's limit and jobs;
- `PUT /admin/limits/{namespace}` with `{"limit": N}`, `DELETE` to go back to the default,
  `POST /admin/limits/{namespace}/pause` (a limit of 0: its jobs wait, none starts).
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path, Query

from common.config import get_config
from common.names import validate_dataset
from common.processing_graph import get_processing_graph
from common.queue import Priority
from common.queue.queue import JobInput
from tasks.api.auth import require_operator

NAMESPACE = r"^[A-Za-z0-9._-]{1,96}$"
AUTH: dict[int | str, dict[str, Any]] = {401: {"description": "no operator key, or a bad, stale or replayed signature"}}


def _limits() -> dict[str, Any]:
    from tasks.queue import get_queue

    overview = get_queue().limiter.overview()
    return {
        "default": get_config().queue.max_jobs_per_namespace,
        "namespaces": {name: dataclasses.asdict(counts) for name, counts in sorted(overview.items())},
    }


def _set_limit(namespace: str, limit: int | None) -> dict[str, Any]:
    from tasks.queue import get_queue

    validate_dataset(namespace)  # a namespace is a dataset name's first part: the same rules
    get_queue().set_limit(namespace, limit)
    return _limits()


def router() -> APIRouter:
    admin = APIRouter(prefix="/admin", tags=["operator"], dependencies=[Depends(require_operator)], responses=AUTH)

    @admin.post("/refresh")
    def refresh(
        dataset: str = Query(description="org/name, or name"),
        priority: Annotated[Priority, Query(description="the priority of its jobs")] = Priority.HIGH,
    ) -> dict[str, Any]:
        """Compute the dataset again from its first step."""
        from tasks.queue import get_queue

        dataset = validate_dataset(dataset)
        roots = [step.name for step in get_processing_graph() if not step.parents]
        jobs = get_queue().enqueue_many([JobInput(step, dataset) for step in roots], priority=priority)
        return {"jobs": [job.job_id for job in jobs]}

    @admin.post("/cancel")
    def cancel(
        dataset: str = Query(description="org/name, or name"),
        revoke: bool = Query(False, description="also stop its running jobs"),
    ) -> dict[str, Any]:
        """Cancel the dataset's jobs."""
        from tasks.queue import get_queue

        jobs = get_queue().cancel(dataset, revoke_started=revoke)
        return {"cancelled": [job.job_id for job in jobs]}

    @admin.get("/limits")
    def limits() -> dict[str, Any]:
        """The namespaces' limits and jobs."""
        return _limits()

    @admin.put("/limits/{namespace}")
    def set_limit(
        namespace: str = Path(pattern=NAMESPACE), limit: Annotated[int, Body(embed=True, ge=0, le=1_000_000)] = 1
    ) -> dict[str, Any]:
        """Set a namespace's limit (0 pauses it)."""
        return _set_limit(namespace, limit)

    @admin.delete("/limits/{namespace}")
    def clear_limit(namespace: str = Path(pattern=NAMESPACE)) -> dict[str, Any]:
        """Back to the default limit (resumes a paused namespace)."""
        return _set_limit(namespace, None)

    @admin.post("/limits/{namespace}/pause")
    def pause(namespace: str = Path(pattern=NAMESPACE)) -> dict[str, Any]:
        """Pause a namespace: its jobs wait, none starts, until its limit is set or cleared."""
        return _set_limit(namespace, 0)

    return admin
