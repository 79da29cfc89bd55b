"""`POST /webhook`: the Hub's repository events (its webhook payload), authenticated by API_WEBHOOK_SECRET
in the `X-Webhook-Secret` header.

- `create`, `update`: a backfill of the dataset at its current revision (stale entries are computed again);
- `delete`: its jobs cancelled (running ones stopped), its cache entries, assets and Parquet files removed;
- `move` (a rename, to `movedTo.name`): its jobs cancelled, its entries, assets and Parquet files moved to
  the new name (the names and URLs inside the entries rewritten), then a backfill of the new name.

Events about models or spaces, and other actions, are acknowledged and ignored.
"""

from __future__ import annotations

import hmac
import shutil
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, Header
from pydantic import BaseModel, ConfigDict, Field

from api.auth import access_cache
from api.errors import AuthenticationRequiredError
from common import cache, orchestrator
from common.config import get_config
from common.constants import REDIS_PREFIX
from common.names import validate_dataset
from common.redis_connection import get_redis

SECRET_HEADER = "X-Webhook-Secret"


class WebhookEvent(BaseModel):
    action: Literal["create", "update", "delete", "move"] | str
    scope: str = "repo"


class WebhookRepo(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    type: str
    name: str = Field(max_length=200)
    head_sha: str | None = Field(None, alias="headSha", max_length=64)


class MovedTo(BaseModel):
    name: str = Field(max_length=200)


class WebhookPayload(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    event: WebhookEvent
    repo: WebhookRepo
    moved_to: MovedTo | None = Field(None, alias="movedTo")


def _directories(dataset: str) -> list[Path]:
    settings = get_config()
    return [settings.assets.storage_path / dataset, settings.worker.parquet_path / dataset]


def forget(dataset: str) -> None:
    access_cache.clear()
    get_redis(get_config().queue.redis_url).delete(f"{REDIS_PREFIX}:api:backfill:{dataset}")


def delete(dataset: str) -> dict[str, Any]:
    from tasks.queue import get_queue

    cancelled = get_queue().cancel(dataset, revoke_started=True)
    deleted = cache.delete_dataset_responses(dataset)
    for directory in _directories(dataset):
        shutil.rmtree(directory, ignore_errors=True)
    forget(dataset)
    return {"cancelled": len(cancelled), "deleted": deleted}


def renamer(old: str, new: str) -> Any:
    settings = get_config()
    prefixes = [
        (f"{settings.assets.base_url.rstrip('/')}/{old}/--/", f"{settings.assets.base_url.rstrip('/')}/{new}/--/"),
        (f"{settings.worker.parquet_path / old}/--/", f"{settings.worker.parquet_path / new}/--/"),
    ]

    def rename(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: new if key == "dataset" and item == old else rename(item) for key, item in value.items()}
        if isinstance(value, list):
            return [rename(item) for item in value]
        if isinstance(value, str):
            for before, after in prefixes:
                if value.startswith(before):
                    return after + value.removeprefix(before)
        return value

    return rename


def move(old: str, new: str) -> dict[str, Any]:
    from tasks.queue import get_queue

    queue = get_queue()
    cancelled = queue.cancel(old, revoke_started=True) + queue.cancel(new, revoke_started=True)
    moved = cache.move_dataset_responses(old, new, renamer(old, new))
    for source, target in zip(_directories(old), _directories(new), strict=True):
        shutil.rmtree(target, ignore_errors=True)
        if source.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(source, target)
    forget(old)
    forget(new)
    jobs = orchestrator.backfill(queue, new, priority="normal")
    return {"cancelled": len(cancelled), "moved": moved, "enqueued": len(jobs)}


def check_secret(x_webhook_secret: str | None = Header(None, description="API_WEBHOOK_SECRET")) -> None:
    """Before the body is even parsed: the shared secret."""
    secret = get_config().api.webhook_secret.get_secret_value()
    if not secret or not hmac.compare_digest((x_webhook_secret or "").encode(), secret.encode()):
        raise AuthenticationRequiredError(f"a webhook needs the shared secret in {SECRET_HEADER}")


def router() -> APIRouter:
    hooks = APIRouter(tags=["webhook"])

    @hooks.post(
        "/webhook",
        dependencies=[Depends(check_secret)],
        responses={401: {"description": "a missing or wrong X-Webhook-Secret"}},
    )
    def webhook(payload: WebhookPayload) -> dict[str, Any]:
        """A repository event of the Hub."""
        from tasks.queue import get_queue

        if payload.repo.type != "dataset" or payload.event.scope != "repo":
            return {"status": "ignored"}
        dataset = validate_dataset(payload.repo.name)
        action = payload.event.action
        if action in ("create", "update"):
            forget(dataset)
            jobs = orchestrator.backfill(get_queue(), dataset, priority="normal")
            return {"status": "ok", "enqueued": len(jobs)}
        if action == "delete":
            return {"status": "ok", **delete(dataset)}
        if action == "move" and payload.moved_to is not None:
            return {"status": "ok", **move(dataset, validate_dataset(payload.moved_to.name))}
        return {"status": "ignored"}

    return hooks
