"""`create_api()`: the FastAPI app, its routes, middlewares and error handlers.

Every error is JSON `{"error": message, "error_code": code}` with the code in `X-Error-Code`: the typed
errors of stepcache with their status (a bad name: 422), FastAPI's validation errors as 422
`InvalidParameterError`, and anything unexpected as 500 `UnexpectedError`, logged with its traceback and
the request id (tasks.api.middleware), never sent. `GET /healthcheck` answers when the API can reach Redis and MongoDB.
Each API process is in the registry (tasks.api.discovery) from its start to its stop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pymongo.errors import PyMongoError
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from common.config import AppConfig, get_config, get_config_or_exit
from common.exceptions import StepcacheError
from tasks.api.assets import router as assets_routes
from tasks.api.auth import AccessCache
from tasks.api.browse import router as browse_routes
from tasks.api.cached import router as cached_routes
from tasks.api.discovery import api_registration
from tasks.api.discovery import router as discovery_routes
from tasks.api.docs_pages import include_docs_pages
from tasks.api.errors import (
    InvalidParameterError,
    MissingRequiredParameterError,
    PayloadTooLargeError,
    ServiceUnavailableError,
    answer_error,
    error_response,
)
from tasks.api.jobs import StreamSlots
from tasks.api.jobs import router as jobs_routes
from tasks.api.middleware import RequestMiddleware
from tasks.api.more_endpoints import router as more_routes
from tasks.api.operator import router as operator_routes
from tasks.api.parquet_files import router as parquet_file_routes
from tasks.api.webhook import router as webhook_routes

logger = logging.getLogger(__name__)
EXPOSED_HEADERS = ["ETag", "Retry-After", "Location", "X-Error-Code", "X-Revision", "X-Request-Id"]
EXPOSED_HEADERS += ["Accept-Ranges", "Content-Range", "Content-Length"]  # a browser reads Parquet by ranges
HTTP_ERROR_CODES = {
    HTTPStatus.NOT_FOUND: "NotFoundError",
    HTTPStatus.METHOD_NOT_ALLOWED: "MethodNotAllowedError",
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: PayloadTooLargeError.__name__,  # the middleware's, from a streamed body
}


def create_api(settings: AppConfig | None = None) -> FastAPI:
    settings = settings or get_config_or_exit()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        import tasks  # noqa: F401  (the Celery app jobs are published through)

        registration = api_registration().start()  # this process, in the registry until it stops
        yield
        await asyncio.to_thread(registration.stop)

    app = FastAPI(
        title="stepcache",
        summary="Precomputed responses about datasets, their jobs and assets",
        version="1",
        lifespan=lifespan,
        docs_url=None,  # include_docs_pages: /docs and /redoc with their files served here, not from a CDN
        redoc_url=None,
    )
    app.state.access_cache = AccessCache()  # the app's: an API process forgets what a webhook says
    app.state.event_streams = StreamSlots()  # this process's open event streams
    for router in (
        cached_routes(),
        browse_routes(),
        more_routes(),
        parquet_file_routes(),
        jobs_routes(),
        assets_routes(settings),
        operator_routes(),
        discovery_routes(),
        webhook_routes(),
    ):
        app.include_router(router)
    app.add_api_route("/healthcheck", healthcheck, methods=["GET"], tags=["health"])
    include_docs_pages(app)
    app.add_exception_handler(StepcacheError, _stepcache_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(PyMongoError, _store_error)
    app.add_exception_handler(RedisError, _store_error)
    app.add_middleware(
        RequestMiddleware,
        max_body_bytes=settings.api.max_body_bytes,
        timeout_seconds=settings.api.request_timeout_seconds,
    )
    origins = settings.api.allowed_origins
    if origins:  # outermost: every answer carries it, the middleware's own (413, 504, 500) too
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "HEAD"],
            allow_headers=["Authorization", "If-None-Match", "X-Request-Id", "Last-Event-ID", "Range", "If-Range"],
            expose_headers=EXPOSED_HEADERS,
            max_age=3600,
        )
    return app


def healthcheck() -> dict[str, str]:
    """Redis and MongoDB answer (within API_REQUEST_TIMEOUT_SECONDS: 504 past it, 503 when one fails)."""
    import pymongo

    from common.cache import cache_collection
    from common.redis_connection import get_redis

    settings = get_config()
    get_redis(settings.queue.redis_url).ping()  # a failure is 503 (_store_error)
    with pymongo.timeout(settings.api.request_timeout_seconds):
        cache_collection().database.command("ping")
    return {"status": "ok"}


async def _stepcache_error(request: Request, error: Exception) -> JSONResponse:
    return answer_error(error)


async def _store_error(request: Request, error: Exception) -> JSONResponse:
    """MongoDB or Redis failed or timed out: 503, to be tried again (the error, with its hosts, is logged)."""
    store = "Redis" if isinstance(error, RedisError) else "MongoDB"
    logger.warning("%s failed on %s: %r", store, request.url.path, error)
    retry = str(get_config().api.retry_after_seconds)
    return answer_error(ServiceUnavailableError(f"{store} does not answer: try again", headers={"Retry-After": retry}))


async def _validation_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    problems = "; ".join(
        f"{'.'.join(str(part) for part in problem.get('loc', ()))}: {problem.get('msg', '')}"
        for problem in error.errors()
    )
    missing = [str(problem.get("loc", ("", ""))[-1]) for problem in error.errors() if problem.get("type") == "missing"]
    if missing and len(missing) == len(error.errors()):
        names = " and ".join(f"'{name}'" for name in missing)
        required = f"Parameter {names} is required" if len(missing) == 1 else f"Parameters {names} are required"
        return answer_error(MissingRequiredParameterError(required))
    return answer_error(InvalidParameterError(f"invalid request: {problems}"[:1000]))


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, HTTPException)
    code = HTTP_ERROR_CODES.get(HTTPStatus(error.status_code), f"HTTP{error.status_code}Error")
    return error_response(error.status_code, str(error.detail), code, dict(error.headers or {}))
