"""Who may read what.

Gated and private datasets
    Served only with `Authorization: Bearer <JWT>`: signed with API_JWT_ALGORITHM (asymmetric only: an
    HMAC or `none` token is refused, so the public key can never be used as a shared secret), verified
    with API_JWT_PUBLIC_KEY, unexpired (`exp` required), for API_JWT_AUDIENCE (`aud` required), and for
    this dataset (`sub` is `datasets/<dataset>`). Whether a dataset is public is asked to the source
    (common.sources) and kept API_ACCESS_CACHE_SECONDS per dataset.
Operator endpoints
    Off (401, saying so) while neither API_OPERATOR_KEY nor API_OPERATOR_SECRET is set. Otherwise
    `Authorization: Bearer <API_OPERATOR_KEY>`, or a request signed with API_OPERATOR_SECRET:
    `X-Stepcache-Timestamp: <unix seconds>`, `X-Stepcache-Nonce: <up to 64 [A-Za-z0-9_-]>` (may be empty)
    and `X-Stepcache-Signature: <hex HMAC-SHA256>` over
    `"<timestamp>\\n<nonce>\\n<METHOD>\\n<path>?<query>\\n<hex SHA-256 of the body>"` (:func:`sign_request`). A
    timestamp outside API_SIGNATURE_WINDOW_SECONDS is stale, and a signature is accepted once: Redis
    remembers it for twice the window.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import re
import secrets
import threading
import time
from collections import OrderedDict
from typing import Any, NoReturn

import jwt
from fastapi import Request
from redis.exceptions import RedisError

from common.config import ApiConfig, get_config
from common.constants import REDIS_PREFIX
from common.exceptions import DatasetNotFoundError, HubTransientError, HubUnavailableError
from common.redis_connection import as_text, get_redis
from common.sources import Access
from tasks.api.errors import (
    NO_ACCESS,
    AuthenticationRequiredError,
    ExternalAuthenticatedError,
    ExternalUnauthenticatedError,
    ForbiddenError,
    PayloadTooLargeError,
)

logger = logging.getLogger(__name__)
REQUIRED_CLAIMS = ["exp", "aud", "sub"]
TIMESTAMP_HEADER = "X-Stepcache-Timestamp"
SIGNATURE_HEADER = "X-Stepcache-Signature"
NONCE_HEADER = "X-Stepcache-Nonce"
TIMESTAMP = re.compile(r"\d{1,12}")
NONCE = re.compile(r"[A-Za-z0-9_-]{0,64}")
SIGNATURE = re.compile(r"[0-9a-f]{64}")
OPERATOR_MAX_BODY_BYTES = 4096
ACCESS_CACHE_SIZE = 10_000
STALE_SECONDS = 3600.0  # how long a dataset's last known access is used while the Hub is down
FORGOTTEN_KEY = f"{REDIS_PREFIX}:api:forgotten"  # datasets a webhook made an API process forget, by time
FORGOTTEN_KEPT_SECONDS = 3600.0
SYNC_SECONDS = 1.0
CLOCK_SKEW_SECONDS = 5.0  # the processes' clocks may differ: forgetting twice costs nothing


class AccessCache:
    """The access of the datasets asked about lately, and which ones the source does not have (bounded,
    least recently used out first): a client asking again and again costs the source one call per
    API_ACCESS_CACHE_SECONDS. While the Hub is down, a dataset's last known access is used for up to an
    hour (stale if error): a Hub outage does not take the cache down with it. A dataset forgotten (by a
    webhook) in one API process is forgotten by every other within a second: the names go to a Redis
    sorted set that each process reads at most once a second."""

    def __init__(self) -> None:
        self._entries: OrderedDict[str, tuple[float, Access | DatasetNotFoundError]] = OrderedDict()
        self._lock = threading.Lock()
        self._synced, self._since = 0.0, time.time()

    def _sync(self) -> None:
        """Forget here what other processes forgot since the last look (at most one look a second)."""
        now = time.monotonic()
        with self._lock:
            if now - self._synced < SYNC_SECONDS:
                return
            self._synced, since, self._since = now, self._since, time.time()
        try:
            names = _redis().zrangebyscore(FORGOTTEN_KEY, since - CLOCK_SKEW_SECONDS, "+inf")
        except RedisError:
            logger.warning("could not read the datasets other API processes forgot", exc_info=True)
            return
        with self._lock:
            for name in names:
                self._entries.pop(as_text(name), None)

    def get(self, dataset: str, ttl: float) -> Access:
        self._sync()
        now = time.monotonic()
        with self._lock:
            known = self._entries.get(dataset)
            if known is not None and now - known[0] < ttl:
                self._entries.move_to_end(dataset)
                if isinstance(known[1], DatasetNotFoundError):
                    raise DatasetNotFoundError(known[1].message)
                return known[1]
        from common.sources import get_source

        try:
            access: Access | DatasetNotFoundError = get_source().access(dataset)
        except DatasetNotFoundError as error:
            access = error
        except (HubUnavailableError, HubTransientError):
            # The Hub is down: what it said last, for a while, rather than no dataset served at all.
            if known is not None and not isinstance(known[1], DatasetNotFoundError) and now - known[0] < STALE_SECONDS:
                return known[1]
            raise
        with self._lock:
            self._entries[dataset] = (now, access)
            self._entries.move_to_end(dataset)
            while len(self._entries) > ACCESS_CACHE_SIZE:
                self._entries.popitem(last=False)
        if isinstance(access, DatasetNotFoundError):
            raise access
        return access

    def forget(self, dataset: str) -> None:
        """Forget the dataset here, and tell the other API processes."""
        with self._lock:
            self._entries.pop(dataset, None)
        now = time.time()
        pipe = _redis().pipeline(transaction=False)
        pipe.zadd(FORGOTTEN_KEY, {dataset: now})
        pipe.zremrangebyscore(FORGOTTEN_KEY, "-inf", now - FORGOTTEN_KEPT_SECONDS)
        pipe.execute()


def _redis() -> Any:
    return get_redis(get_config().queue.redis_url)


def bearer(request: Request) -> str | None:
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return credentials.strip() or None


def check_dataset_access(request: Request, dataset: str) -> Access:
    """The dataset's access; for a gated or private one, a valid JWT for it. Otherwise the viewer's answer,
    the same whether the dataset exists or not: 401 ExternalUnauthenticatedError without a valid JWT, 404
    ExternalAuthenticatedError with one (for another dataset); the message then says why."""
    settings = get_config().api
    access_cache: AccessCache = request.app.state.access_cache
    try:
        access = access_cache.get(dataset, settings.access_cache_seconds)
        if access != "public":
            check_token(bearer(request), dataset, settings)
    except DatasetNotFoundError:
        no_such_dataset(request)
    except (AuthenticationRequiredError, ForbiddenError) as error:
        # The same words as for a dataset that does not exist: why is logged here, never answered.
        logger.info("no access to a dataset that is not public: %s", error.message)
        authenticated = isinstance(error, ForbiddenError)  # a valid JWT, for another dataset
        raise (ExternalAuthenticatedError if authenticated else ExternalUnauthenticatedError)(NO_ACCESS) from None
    return access


def no_such_dataset(request: Request) -> NoReturn:
    """The viewer's answer for a dataset that does not exist (or a name none can have): 401
    ExternalUnauthenticatedError, or 404 ExternalAuthenticatedError when the request sent a valid JWT."""
    token = bearer(request)
    authenticated = token is not None and _valid_token(token, get_config().api)
    raise (ExternalAuthenticatedError if authenticated else ExternalUnauthenticatedError)(NO_ACCESS)


def _valid_token(token: str, settings: ApiConfig) -> bool:
    """Whether the JWT is one of this API's (valid, unexpired), whatever dataset it names."""
    if not settings.jwt_public_key:
        return False
    try:
        jwt.decode(
            token,
            settings.jwt_public_key,
            algorithms=[settings.jwt_algorithm],
            audience=settings.jwt_audience,
            options={"require": REQUIRED_CLAIMS},  # as check_token: the same tokens valid in both
        )
    except jwt.InvalidTokenError:
        return False
    return True


def check_token(token: str | None, dataset: str, settings: ApiConfig) -> None:
    if token is None:
        raise AuthenticationRequiredError(f"{dataset} is not public: send a JWT for it (Authorization: Bearer)")
    if not settings.jwt_public_key:
        raise AuthenticationRequiredError("this API checks no token: API_JWT_PUBLIC_KEY is not set")
    try:
        claims = jwt.decode(
            token,
            settings.jwt_public_key,
            algorithms=[settings.jwt_algorithm],
            audience=settings.jwt_audience,
            options={"require": REQUIRED_CLAIMS},
        )
    except jwt.ExpiredSignatureError:
        raise AuthenticationRequiredError("the token has expired") from None
    except jwt.InvalidTokenError as error:
        raise AuthenticationRequiredError(f"the token is not valid: {error}") from None
    if claims.get("sub") != f"datasets/{dataset}":
        raise ForbiddenError(f"the token does not give access to {dataset}")


def request_digest(secret: str, timestamp: str, nonce: str, method: str, target: str, body: bytes) -> str:
    """The signature of a request to `target` (its path and, after `?`, its query) at `timestamp`."""
    message = f"{timestamp}\n{nonce}\n{method.upper()}\n{target}\n{hashlib.sha256(body).hexdigest()}"
    return hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()


def sign_request(secret: str, method: str, target: str, body: bytes = b"", now: float | None = None) -> dict[str, str]:
    """The headers that sign an operator request (what a client of the operator endpoints sends): a new
    nonce each time, so the same request sent twice in a second is two requests, not a replay."""
    timestamp, nonce = str(int(time.time() if now is None else now)), secrets.token_hex(16)
    digest = request_digest(secret, timestamp, nonce, method, target, body)
    return {TIMESTAMP_HEADER: timestamp, NONCE_HEADER: nonce, SIGNATURE_HEADER: digest}


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request's body, refused (413) when its Content-Length says it is over `max_bytes` or as soon as
    more than that has streamed in."""
    too_big = PayloadTooLargeError(f"the body of {request.url.path} is at most {max_bytes} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise too_big
    return bytes(body)


async def require_operator(request: Request) -> None:
    """A FastAPI dependency: the operator's key, or a fresh signature seen for the first time."""
    from starlette.concurrency import run_in_threadpool

    settings = get_config().api
    key = settings.operator_key.get_secret_value()
    secret = settings.operator_secret.get_secret_value()
    if not key and not secret:
        raise AuthenticationRequiredError(
            "the operator endpoints are off: neither API_OPERATOR_KEY nor API_OPERATOR_SECRET is set"
        )
    token = bearer(request)
    if key and token is not None:
        if hmac.compare_digest(token.encode(), key.encode()):
            return
        raise AuthenticationRequiredError("wrong operator key")
    timestamp, signature = request.headers.get(TIMESTAMP_HEADER), request.headers.get(SIGNATURE_HEADER)
    nonce = request.headers.get(NONCE_HEADER, "")
    if not secret or timestamp is None or signature is None:
        raise AuthenticationRequiredError(
            "operator endpoints need Authorization: Bearer <API_OPERATOR_KEY> or a request signed with "
            f"API_OPERATOR_SECRET ({TIMESTAMP_HEADER}, {SIGNATURE_HEADER})"
        )
    if not TIMESTAMP.fullmatch(timestamp) or not NONCE.fullmatch(nonce) or not SIGNATURE.fullmatch(signature):
        raise AuthenticationRequiredError(
            f"{TIMESTAMP_HEADER} is unix seconds, {NONCE_HEADER} up to 64 [A-Za-z0-9_-], "
            f"{SIGNATURE_HEADER} 64 hex digits"
        )
    age = abs(time.time() - int(timestamp))
    if age > settings.signature_window_seconds:
        raise AuthenticationRequiredError(f"stale signature: its timestamp is {age:.0f} s away from now")
    query = request.url.query
    target = request.url.path + (f"?{query}" if query else "")
    # Only now, the headers checked, the body (small: an operator's request carries a few numbers at most).
    body = await read_body(request, OPERATOR_MAX_BODY_BYTES)
    expected = request_digest(secret, timestamp, nonce, request.method, target, body)
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        raise AuthenticationRequiredError("the request's signature does not match it")
    window = math.ceil(2 * settings.signature_window_seconds)
    first = await run_in_threadpool(
        get_redis(get_config().queue.redis_url).set, f"{REDIS_PREFIX}:api:signature:{signature}", 1, nx=True, ex=window
    )
    if not first:
        raise AuthenticationRequiredError("replayed signature: this signed request was already received")
