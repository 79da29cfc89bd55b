"""What stepcache does about failures of the servers it talks to.

Transient errors (a dropped Redis or MongoDB connection, a Hub timeout or 5xx answer) are retried with
exponential backoff and jitter, a bounded number of times (:data:`retry_transient`). The Hub is behind a
circuit breaker whose state is shared by every process through Redis: after `fail_max` failures in a
row it opens, and calls fail fast with :class:`HubUnavailableError` until `reset_timeout` passed; then
one trial call half-opens it, and a success closes it again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ParamSpec, TypeVar, cast

import pybreaker
import redis
from pymongo.errors import AutoReconnect, NetworkTimeout, ServerSelectionTimeoutError
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from common.exceptions import HubTransientError, HubUnavailableError
from common.redis_connection import RedisClient

P = ParamSpec("P")
R = TypeVar("R")

RETRY_ATTEMPTS = 5
RETRY_MAX_WAIT_SECONDS = 5.0
BREAKER_NAMESPACE = "stepcache:breaker"


TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.ClusterDownError,  # a cluster's master failing over: its replica takes over soon
    redis.exceptions.TryAgainError,  # a cluster moving a slot
    redis.exceptions.ClusterError,  # redirections exhausted while a slot migrates
    AutoReconnect,
    NetworkTimeout,
    ServerSelectionTimeoutError,
    HubTransientError,
)

retry_transient = retry(
    retry=retry_if_exception_type(TRANSIENT_ERRORS),
    wait=wait_random_exponential(multiplier=0.05, max=RETRY_MAX_WAIT_SECONDS),
    stop=stop_after_attempt(RETRY_ATTEMPTS),
    reraise=True,
)
"""Decorator: retry a call on transient errors, up to RETRY_ATTEMPTS times, with jittered backoff."""


def hub_breaker(
    client: RedisClient, name: str = "hub", fail_max: int = 5, reset_timeout: float = 30
) -> pybreaker.CircuitBreaker:
    """A circuit breaker around the Hub whose state every process shares through Redis."""
    # pybreaker types its client as redis.Redis; a cluster's has the same one-key commands it uses.
    storage = pybreaker.CircuitRedisStorage(
        pybreaker.STATE_CLOSED, cast(redis.Redis, client), namespace=f"{BREAKER_NAMESPACE}:{name}"
    )
    return pybreaker.CircuitBreaker(
        fail_max=fail_max,
        reset_timeout=reset_timeout,
        state_storage=storage,
        name=name,
        exclude=[lambda error: not isinstance(error, TRANSIENT_ERRORS)],
    )


def call_hub(breaker: pybreaker.CircuitBreaker, function: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Call the Hub through the breaker, retrying transient errors; an open breaker fails fast."""

    @retry_transient
    def attempt() -> R:
        return call_hub_once(breaker, function, *args, **kwargs)

    return attempt()


def call_hub_once(breaker: pybreaker.CircuitBreaker, function: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Call the Hub through the breaker once (a call that cannot be repeated, such as reading the next
    rows of a stream): a failure is counted, not retried; an open breaker fails fast."""
    try:
        return breaker.call(function, *args, **kwargs)
    except pybreaker.CircuitBreakerError as error:
        raise HubUnavailableError("the Hub is failing: calls are suspended for a while", cause=error) from error
