"""What every request goes through, outermost first, in one ASGI middleware (`RequestMiddleware`):

- a request id (the client's `X-Request-Id` when it is a short token, else a new one) set in the logging
  context (common.logging.request_context): every log line and event of the request carries it, and the
  response echoes it;
- the access log: one line per request (`stepcache.api.access`), its query's signatures masked;
- an unexpected error: logged with its traceback and the request id, answered 500 `UnexpectedError`;
- Prometheus metrics by route template and known method (never by raw path: the series stay bounded):
  `stepcache_api_requests_total{method,route,status}` and `stepcache_api_request_duration_seconds`;
- bounded requests: a body over API_MAX_BODY_BYTES is refused (413) from its Content-Length or as it
  streams in, and a request whose answer has not begun within API_REQUEST_TIMEOUT_SECONDS gets 504 then,
  even when it is stuck in a thread on a stalled MongoDB or Redis (an answer that has begun, an event
  stream, runs to its end: tasks.api.jobs bounds it).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import Counter, Histogram
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.logging import request_context
from tasks.api.errors import PayloadTooLargeError, RequestTimeoutError, answer_error

REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_SIGNATURE = re.compile(r"(signature=)[^&]*", re.IGNORECASE)
access_log = logging.getLogger("stepcache.api.access")
logger = logging.getLogger(__name__)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})  # any other: "other"
REQUESTS = Counter("stepcache_api_requests", "API requests answered", ["method", "route", "status"])
DURATION = Histogram(
    "stepcache_api_request_duration_seconds",
    "Time to answer an API request (to the start of the response)",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


def request_id_of(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == REQUEST_ID_HEADER.encode():
            text: str = value.decode("latin-1")
            if _REQUEST_ID.fullmatch(text):
                return text
    return uuid.uuid4().hex


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class RequestMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int, timeout_seconds: float) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.timeout_seconds = timeout_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope)
        method = scope["method"] if scope["method"] in METHODS else "other"
        too_big = f"the request body is over {self.max_body_bytes} bytes"
        started = time.perf_counter()
        status: dict[str, Any] = {"code": 500, "sent": False, "timed_out": False}

        async def send_with_id(message: Message) -> None:
            if status["timed_out"]:  # a request left running past its timeout: its late answer goes nowhere
                return
            if message["type"] == "http.response.start":
                status["code"], status["sent"] = message["status"], True
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER.encode(), request_id.encode())]
                DURATION.labels(method, _route(scope)).observe(time.perf_counter() - started)
            await send(message)

        received = 0

        async def bounded_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:  # an HTTPException: FastAPI passes it on from the body's parsing
                raise HTTPException(413, too_big)
            return message

        with request_context(request_id):
            try:
                length = _content_length(scope)
                if length is not None and length > self.max_body_bytes:
                    await answer_error(PayloadTooLargeError(too_big))(scope, receive, send_with_id)
                else:
                    await self._within_timeout(self.app(scope, bounded_receive, send_with_id), lambda: status["sent"])
            except TimeoutError:
                if not status["sent"]:
                    timeout = RequestTimeoutError(f"the request was not answered within {self.timeout_seconds} s")
                    await answer_error(timeout)(scope, receive, send_with_id)
                status["timed_out"] = True
            except Exception as error:
                # Here, not in Starlette's outermost handler: the line and the answer keep the request id.
                logger.exception("unexpected error on %s %s", scope["method"], _target(scope))
                if not status["sent"]:
                    await answer_error(error)(scope, receive, send_with_id)  # 500 UnexpectedError, no detail
            finally:
                elapsed_ms = (time.perf_counter() - started) * 1000
                REQUESTS.labels(method, _route(scope), str(status["code"])).inc()
                client = scope.get("client") or ("-", 0)
                access_log.info('%s "%s %s" %s %.1fms', client[0], method, _target(scope), status["code"], elapsed_ms)

    async def _within_timeout(self, answer: Awaitable[None], begun: Callable[[], bool]) -> None:
        """Await the answer; raise TimeoutError when it has not `begun` within the timeout, without waiting
        for it to stop: a request blocked in a thread (a call to a stalled MongoDB) cannot be interrupted,
        and is left to end on its own, its answer dropped. Once begun, it runs to its end (an event stream
        bounds itself)."""
        task = asyncio.ensure_future(answer)
        await asyncio.wait({task}, timeout=self.timeout_seconds)
        if task.done() or begun():
            await task
            return
        task.cancel()
        task.add_done_callback(_forget)
        raise TimeoutError


def _forget(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("a request that timed out failed later: %r", task.exception())


def _target(scope: Scope) -> str:
    """The request's path and query as received (percent-encoded: no line breaks to forge log lines with),
    its signatures masked."""
    path: bytes = scope.get("raw_path") or scope["path"].encode("unicode_escape")
    query = _SIGNATURE.sub(r"\1***", scope.get("query_string", b"").decode("latin-1"))
    return path.decode("latin-1") + (f"?{query}" if query else "")


def _route(scope: Scope) -> str:
    route = scope.get("route")
    return str(getattr(route, "path", "unmatched"))
