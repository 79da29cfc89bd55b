"""What the benchmark runs: stepcache steps and plain Celery tasks doing the same work.

A worker imports this module with `celery -A tasks worker -I bench.steps`. Every task records when
it started in the Redis list `bench:starts` (`<label> <time>`), from the worker process.
"""

from __future__ import annotations

import functools
import os
import time
from datetime import UTC, datetime
from typing import Any

import redis
from celery import Task, shared_task
from pymongo.collection import Collection

from common.config import get_config
from common.mongo import get_database
from tasks.steps import StepJob, step

STARTS_KEY = "bench:starts"
COUNTER_KEY = "bench:running:{namespace}"
SLEEP_SECONDS = float(os.environ.get("BENCH_SLEEP_SECONDS", "0.01"))
RETRY_LIMIT = int(os.environ.get("QUEUE_MAX_JOBS_PER_NAMESPACE", "1"))


def _redis() -> redis.Redis:
    return redis.Redis.from_url(get_config().queue.redis_url.get_secret_value())


def _record(label: str) -> None:
    _redis().rpush(STARTS_KEY, f"{label} {time.time()}")


@step("bench-noop", input_type="dataset")
def bench_noop(job: StepJob) -> dict[str, Any]:
    return {}


@step("bench-sleep", input_type="dataset")
def bench_sleep(job: StepJob) -> dict[str, Any]:
    _record(job.dataset)
    time.sleep(SLEEP_SECONDS)
    _record(f"end:{job.dataset}")
    return {}


@shared_task(name="bench.plain-noop")  # type: ignore[untyped-decorator]
def plain_noop(dataset: str) -> dict[str, Any]:
    return {}


@functools.cache
def _results() -> Collection[dict[str, Any]]:
    """The hand-written task's results, indexed on what its upsert filters by, as any user would."""
    settings = get_config().cache
    collection = get_database(settings.mongo_url, settings.mongo_database)["bench_plain_results"]
    collection.create_index([("kind", 1), ("dataset", 1)], unique=True)
    return collection


@shared_task(name="bench.plain-mongo-upsert")  # type: ignore[untyped-decorator]
def plain_mongo_upsert(dataset: str) -> dict[str, Any]:
    """What a user writes by hand to get "results in a Mongo cache": a no-op that upserts its result."""
    _results().update_one(
        {"kind": "bench-plain", "dataset": dataset},
        {"$set": {"content": {}, "http_status": 200, "updated_at": datetime.now(UTC)}},
        upsert=True,
    )
    return {}


@shared_task(name="bench.plain-sleep")  # type: ignore[untyped-decorator]
def plain_sleep(dataset: str) -> dict[str, Any]:
    _record(dataset)
    time.sleep(SLEEP_SECONDS)
    return {}


@shared_task(name="bench.retry-sleep", bind=True, max_retries=None)  # type: ignore[untyped-decorator]
def retry_sleep(self: Task, dataset: str) -> dict[str, Any]:
    """The usual recipe: a per-namespace counter, and retry with a countdown when over the limit."""
    client = _redis()
    key = COUNTER_KEY.format(namespace=dataset.split("/")[0])
    if client.incr(key) > RETRY_LIMIT:
        client.decr(key)
        raise self.retry(countdown=0.5)
    try:
        _record(dataset)
        time.sleep(SLEEP_SECONDS)
        return {}
    finally:
        client.decr(key)
