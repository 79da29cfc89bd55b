"""The test harness: real servers, clean databases for every test.

A session starts its own throwaway `redis-server` (from PATH) and an embedded SecantusDB (a MongoDB
wire-protocol server) on free ports, unless TEST_REDIS_URL / TEST_MONGO_URL name external servers.
The `stores` fixture gives a test fresh databases whose names contain `test` and a flushed Redis
database, and points the process's settings (and any worker it starts) at them.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from celery import Celery
from pymongo import MongoClient

from common import mongo
from common.config import AppConfig, QueueConfig, get_config
from tasks.embedded import EmbeddedServer, ServerUnavailableError, start_mongo, start_redis

SETTINGS_PREFIXES = ("ASSETS_", "COMMON_", "CACHE_", "QUEUE_", "WORKER_")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    external = os.environ.get("TEST_REDIS_URL")
    if external:
        yield external
        return
    if shutil.which("redis-server") is None:
        pytest.exit(
            "redis-server not found on PATH: install it (apt-get install redis-server) or set TEST_REDIS_URL",
            returncode=3,
        )
    server = _started(start_redis)
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def mongo_url() -> Iterator[str]:
    external = os.environ.get("TEST_MONGO_URL")
    if external:
        yield external
        return
    server = _started(start_mongo)
    yield server.url
    server.stop()


def _started(start: Callable[[], EmbeddedServer]) -> EmbeddedServer:
    try:
        return start()
    except ServerUnavailableError as error:
        pytest.exit(str(error), returncode=3)


@dataclass(frozen=True)
class Stores:
    """Where this test's data lives: the URLs and database names its settings point at."""

    redis_url: str
    mongo_url: str
    cache_database: str
    queue_database: str

    def env(self) -> dict[str, str]:
        """The environment a worker process needs to use the same stores."""
        return {
            "QUEUE_REDIS_URL": self.redis_url,
            "CACHE_MONGO_URL": self.mongo_url,
            "QUEUE_MONGO_URL": self.mongo_url,
            "CACHE_MONGO_DATABASE": self.cache_database,
            "QUEUE_MONGO_DATABASE": self.queue_database,
        }


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[pytest.MonkeyPatch]:
    """No stepcache variable from the outside environment or a `.env` file leaks into the test."""
    for name in list(os.environ):
        if name.startswith(SETTINGS_PREFIXES):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    get_config.cache_clear()
    yield monkeypatch
    get_config.cache_clear()


def use_settings(monkeypatch: pytest.MonkeyPatch, values: dict[str, str]) -> dict[str, str]:
    """Set these variables for this process's settings (re-read) and return them for the workers it starts:
    the enqueuing process and its workers must share the same settings."""
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    get_config.cache_clear()
    return values


@pytest.fixture
def stores(clean_env: pytest.MonkeyPatch, redis_url: str, mongo_url: str) -> Iterator[Stores]:
    run = uuid.uuid4().hex[:12]
    result = Stores(redis_url, mongo_url, f"stepcache_test_{run}_cache", f"stepcache_test_{run}_queue")
    use_settings(clean_env, result.env())
    redis_client = redis.Redis.from_url(redis_url)
    redis_client.flushdb()
    yield result
    mongo.close_clients()
    redis_client.flushdb()
    redis_client.close()
    client: MongoClient[dict[str, object]] = MongoClient(mongo_url)
    client.drop_database(result.cache_database)
    client.drop_database(result.queue_database)
    client.close()


def app_for(redis_url: str) -> Celery:
    """stepcache's app, built by create_app like any user's, for the environment's settings and this Redis."""
    from tasks import create_app

    settings = AppConfig.from_env()
    return create_app(settings.model_copy(update={"queue": QueueConfig(redis_url=redis_url)}))


@contextmanager
def current_app_for(redis_url: str) -> Iterator[Celery]:
    """This process publishes (through the queue's dispatcher) with an app for `redis_url` while the block
    runs; the app that was current comes back after."""
    from celery import current_app

    previous = current_app._get_current_object()
    app = app_for(redis_url)
    try:
        yield app
    finally:
        previous.set_current()
        app.close()


@pytest.fixture(scope="session")
def session_app(redis_url: str) -> Celery:
    import tests.sample_steps  # noqa: F401  (registers the sample steps, as a user module would)

    return app_for(redis_url)


@pytest.fixture
def celery_app(session_app: Celery) -> Celery:
    """stepcache's app, pointed at the session's Redis, with the sample steps registered; the current app
    (the one get_queue() publishes through) while the test runs."""
    session_app.set_current()
    return session_app


@pytest.fixture
def worker(stores: Stores, celery_app: Celery) -> Iterator[object]:
    """Celery's in-process test worker (a thread pool of 4) consuming both queues."""
    from celery.contrib.testing.worker import start_worker

    with start_worker(
        celery_app,
        pool="threads",
        concurrency=4,
        perform_ping_check=False,
        queues=["light", "heavy"],
        shutdown_timeout=30,
    ) as running:
        yield running
