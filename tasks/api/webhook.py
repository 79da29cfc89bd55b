"""`POST /webhook`: the Hub's repository events (its webhook payload), authenticated by API_WEBHOOK_SECRET
in the `X-Webhook-Secret` header.

- `create`, `update`: a backfill of the dataset at its current revision (stale entries are computed again);
- `delete`: its jobs cancelled (running ones stopped), its cache entries, assets and Parquet files removed;
- `move` (a rename, to `movedTo.name`): its jobs cancelled, its entries, assets and Parquet files moved to
  the new name (the names and URLs inside the entries rewritten), then a backfill of the new name.

Events about models or spaces, and other actions, are acknowledged and ignored.

The secret is checked before a byte of the body is read (the endpoint declares no body: FastAPI reads none
before its dependencies run), then at most WEBHOOK_MAX_BODY_BYTES are read (413 past it, declared or
streamed) and validated (422).
"""

from __future__ import annotations

import hmac
import uuid
from collections.abc import Callable
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, Header, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common import cache, orchestrator
from common.config import get_config
from common.constants import REDIS_PREFIX
from common.names import validate_dataset
from common.redis_connection import get_redis
from tasks.api.assets import map_media_sources
from tasks.api.auth import AccessCache, read_body
from tasks.api.errors import AuthenticationRequiredError, InvalidParameterError
from tasks.removal import dataset_directories, remove_dataset, remove_directory

SECRET_HEADER = "X-Webhook-Secret"
WEBHOOK_MAX_BODY_BYTES = 64 * 1024  # a payload of the Hub is a few KB


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


def forget(access: AccessCache, dataset: str) -> None:
    access.forget(dataset)  # here at once, in the other API processes within a second
    get_redis(get_config().queue.redis_url).delete(f"{REDIS_PREFIX}:api:backfill:{dataset}")


def delete(access: AccessCache, dataset: str) -> dict[str, Any]:
    removed = remove_dataset(dataset)
    forget(access, dataset)
    return removed


def renamer(old: str, new: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Rewrites an entry's content for the new name: the `dataset` fields, the Parquet files' `path`, and
    the `src` of first rows' image and audio cells; the rows' data stays as it is."""
    settings = get_config()
    base = settings.assets.base_url.rstrip("/")
    assets = [(f"{base}/{quote(old, safe='/')}/--/", f"{base}/{quote(new, safe='/')}/--/")]
    storage = settings.worker.parquet_path
    # Relative to the Parquet storage; an entry written before paths were relative holds absolute ones.
    parquet = [(f"{old}/--/", f"{new}/--/"), (f"{storage / old}/--/", f"{storage / new}/--/")]

    def moved(value: str, prefixes: list[tuple[str, str]]) -> str:
        for before, after in prefixes:
            if value.startswith(before):
                return after + value.removeprefix(before)
        return value

    def rename(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                key: new
                if key == "dataset" and item == old
                else moved(item, parquet)
                if key == "path" and isinstance(item, str)
                else item
                if key == "rows"
                else rename(item)
                for key, item in value.items()
            }
        if isinstance(value, list):
            return [rename(item) for item in value]
        return value

    return lambda content: map_media_sources(rename(content), lambda source: moved(source, assets))


def move(access: AccessCache, old: str, new: str) -> dict[str, Any]:
    """Entries first (every content rewritten before any is written), then files; a retried move finds
    nothing left under the old name and leaves the new one as the first try made it."""
    from tasks.queue import get_queue

    if old == new:
        raise InvalidParameterError(f"a dataset is not moved to its own name ({old})")
    queue = get_queue()
    cancelled = queue.cancel(old, revoke_started=True) + queue.cancel(new, revoke_started=True)
    moved = cache.move_dataset_responses(old, new, renamer(old, new))
    for source, target in zip(dataset_directories(old), dataset_directories(new), strict=True):
        if not source.exists():
            continue
        # Through a staging name: on a case-insensitive file system, `Org/A` and `org/a` are one folder.
        staging = source.parent.parent / f".moving-{uuid.uuid4().hex}"
        source.rename(staging)
        remove_directory(source)  # the old dataset's folder, now empty
        remove_directory(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(target)
    forget(access, old)
    forget(access, new)
    jobs = orchestrator.backfill(queue, new, priority="normal")
    return {"cancelled": len(cancelled), "moved": moved, "enqueued": len(jobs)}


def check_secret(x_webhook_secret: str | None = Header(None, description="API_WEBHOOK_SECRET")) -> None:
    """The shared secret, compared in constant time."""
    secret = get_config().api.webhook_secret.get_secret_value()
    if not secret or not hmac.compare_digest((x_webhook_secret or "").encode(), secret.encode()):
        raise AuthenticationRequiredError(f"a webhook needs the shared secret in {SECRET_HEADER}")


async def read_payload(request: Request, _: Annotated[None, Depends(check_secret)]) -> WebhookPayload:
    """The payload, read and validated once the secret is checked (a dependency of this one: it runs first)."""
    body = await read_body(request, WEBHOOK_MAX_BODY_BYTES)
    try:
        return WebhookPayload.model_validate_json(body)
    except ValidationError as error:  # answered 422 InvalidParameter, as FastAPI's own validation
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in error.errors()]) from None


def _inlined(schema: Any, definitions: dict[str, Any]) -> Any:
    """A JSON schema with its `$defs` references replaced by the definitions: an OpenAPI document resolves
    `$ref` from its own root."""
    if isinstance(schema, dict):
        if "$ref" in schema:
            return _inlined(definitions[schema["$ref"].rsplit("/", 1)[-1]], definitions)
        return {key: _inlined(value, definitions) for key, value in schema.items() if key != "$defs"}
    if isinstance(schema, list):
        return [_inlined(item, definitions) for item in schema]
    return schema


def _payload_schema() -> dict[str, Any]:
    schema = WebhookPayload.model_json_schema()
    return {"required": True, "content": {"application/json": {"schema": _inlined(schema, schema.get("$defs", {}))}}}


def router() -> APIRouter:
    hooks = APIRouter(tags=["webhook"])

    @hooks.post(
        "/webhook",
        responses={
            401: {"description": "a missing or wrong X-Webhook-Secret"},
            413: {"description": f"a body over {WEBHOOK_MAX_BODY_BYTES} bytes"},
        },
        openapi_extra={"requestBody": _payload_schema()},
    )
    def webhook(request: Request, payload: Annotated[WebhookPayload, Depends(read_payload)]) -> dict[str, Any]:
        """A repository event of the Hub."""
        from tasks.queue import get_queue

        access: AccessCache = request.app.state.access_cache
        if payload.repo.type != "dataset" or payload.event.scope != "repo":
            return {"status": "ignored"}
        dataset = validate_dataset(payload.repo.name)
        action = payload.event.action
        if action in ("create", "update"):
            forget(access, dataset)
            jobs = orchestrator.backfill(get_queue(), dataset, priority="normal")
            return {"status": "ok", "enqueued": len(jobs)}
        if action == "delete":
            return {"status": "ok", **delete(access, dataset)}
        if action == "move" and payload.moved_to is not None:
            return {"status": "ok", **move(access, dataset, validate_dataset(payload.moved_to.name))}
        return {"status": "ignored"}

    return hooks
