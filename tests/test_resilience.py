from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pybreaker
import pytest
import redis

from common.exceptions import HubUnavailableError
from common.resilience import HubTransientError, call_hub, hub_breaker, retry_transient
from tests.conftest import Stores


def test_transient_errors_are_retried_and_others_are_not() -> None:
    calls = {"flaky": 0, "broken": 0}

    @retry_transient
    def flaky() -> str:
        calls["flaky"] += 1
        if calls["flaky"] < 3:
            raise redis.ConnectionError("connection reset")
        return "ok"

    @retry_transient
    def broken() -> None:
        calls["broken"] += 1
        raise ValueError("a bug, not an outage")

    assert flaky() == "ok" and calls["flaky"] == 3
    with pytest.raises(ValueError):
        broken()
    assert calls["broken"] == 1


def test_retries_are_bounded() -> None:
    calls = 0

    @retry_transient
    def down() -> None:
        nonlocal calls
        calls += 1
        raise redis.TimeoutError("still down")

    with pytest.raises(redis.TimeoutError):
        down()
    assert calls == 5


def test_the_breaker_opens_fails_fast_half_opens_and_closes_again(stores: Stores) -> None:
    client = redis.Redis.from_url(stores.redis_url)
    breaker = hub_breaker(client, name="test-hub", fail_max=3, reset_timeout=30)
    calls = 0

    def hub(fail: bool) -> str:
        nonlocal calls
        calls += 1
        if fail:
            raise HubTransientError("502 from the Hub")
        return "answer"

    with pytest.raises(HubUnavailableError):
        call_hub(breaker, hub, True)  # retried until the breaker opened
    assert calls == 3
    assert breaker.current_state == pybreaker.STATE_OPEN
    # Another process sees the same state through Redis, and fails fast without calling the Hub.
    other = hub_breaker(redis.Redis.from_url(stores.redis_url), name="test-hub", fail_max=3, reset_timeout=30)
    assert other.current_state == pybreaker.STATE_OPEN
    with pytest.raises(HubUnavailableError):
        call_hub(other, hub, False)
    assert calls == 3
    # The breaker stores when it opened in whole seconds; pretend its reset timeout went by.
    opened_at_key = breaker._state_storage._namespace("opened_at")
    client.set(opened_at_key, int((datetime.now(UTC) - timedelta(seconds=60)).timestamp()))
    assert call_hub(breaker, hub, False) == "answer"  # the half-open trial call succeeds...
    assert breaker.current_state == pybreaker.STATE_CLOSED  # ...and closes the breaker
    assert other.current_state == pybreaker.STATE_CLOSED


def test_errors_that_are_not_outages_do_not_open_the_breaker(stores: Stores) -> None:
    breaker = hub_breaker(redis.Redis.from_url(stores.redis_url), name="test-hub-2", fail_max=2)

    def missing() -> None:
        raise LookupError("no such dataset")

    for _ in range(5):
        with pytest.raises(LookupError):
            call_hub(breaker, missing)
    assert breaker.current_state == pybreaker.STATE_CLOSED
