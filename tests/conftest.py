"""The test harness: real servers, clean databases for every test.

A session starts its own throwaway `redis-server` (from PATH) and an embedded SecantusDB (a MongoDB
wire-protocol server) on free ports, unless TEST_REDIS_URL / TEST_MONGO_URL name external servers.
The `stores` fixture gives a test fresh databases whose names contain `test` and a flushed Redis
database, and points the process's settings (and any worker it starts) at them. Celery's fixtures come from
pytest-celery's plugin: `celery_app` is stepcache's app for the test's settings (its `celery_config` is
celeryconfig's for them, so Celery's broker and results are on the test's Redis), `celery_worker` a
thread-pool worker of it in this process.

A test module marked `redis_topologies` runs each of its fast tests that use `stores` twice: on the
single Redis (`[single]`), and with QUEUE_REDIS_URL at a three-master Redis Cluster the session starts
when first needed (`[cluster]`, marked `cluster`; TEST_REDIS_CLUSTER_URL names an external one), Celery's
broker staying on the single Redis through CELERY_BROKER_URL. `-m "not cluster"` skips the second runs.
A test asks for one topology with `@pytest.mark.parametrize("redis_topology", [...], indirect=True)`:
SINGLE, CLUSTER, or SENTINEL (a master and a Sentinel, broker included).
"""

from __future__ import annotations

import gc
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest
import redis
from celery import Celery

# Celery's in-process `celery_worker`: pytest-celery 1.x's plugin also defines one, a Docker container
# (pytest-celery issue 442), which this import shadows for the tests here.
from celery.contrib.pytest import celery_worker  # noqa: F401
from pymongo import MongoClient

from common import mongo
from common.config import AppConfig, QueueConfig, get_config
from common.processing_graph import QueueName
from common.redis_connection import RedisClient, connect
from tasks.embedded import ServerUnavailableError, start_mongo, start_redis

SETTINGS_PREFIXES = (
    "ASSETS_",
    "COMMON_",
    "CACHE_",
    "QUEUE_",
    "WORKER_",
    "API_",
    "CELERY_BROKER_URL",
    "STEPCACHE_CONFIG",
)
# A `make run` of this checkout left running: its settings file (common.config) is not the tests'.
os.environ["STEPCACHE_RUN_ENV"] = ""
SINGLE, CLUSTER, SENTINEL = "single", "cluster", "sentinel"
T = TypeVar("T")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests of a module marked `redis_topologies` that use the stores run on one Redis, then on a cluster
    (its slow tests, with real worker processes, on one Redis only: tests/test_redis_topologies.py runs
    real workers on a cluster)."""
    definition = metafunc.definition
    topologies_wanted = definition.get_closest_marker("redis_topologies") and not definition.get_closest_marker("slow")
    if topologies_wanted and "stores" in metafunc.fixturenames:
        topologies = [SINGLE, pytest.param(CLUSTER, marks=pytest.mark.cluster)]
        metafunc.parametrize("redis_topology", topologies, indirect=True)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    yield from _served(
        "TEST_REDIS_URL",
        start_redis,
        "redis-server",
        "redis-server not found on PATH: install it (apt-get install redis-server) or set TEST_REDIS_URL",
    )


@pytest.fixture(scope="session")
def mongo_url() -> Iterator[str]:
    yield from _served("TEST_MONGO_URL", start_mongo)


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """A Redis Cluster of three masters (redis+cluster:// URL), started once per session when asked for."""
    from tests.redis_servers import start_cluster

    yield from _served(
        "TEST_REDIS_CLUSTER_URL",
        start_cluster,
        "redis-cli",
        "redis-cli not found on PATH: install it (apt-get install redis-tools)",
    )


@pytest.fixture(scope="session")
def redis_sentinel_url() -> Iterator[str]:
    """One master and one Sentinel monitoring it (redis+sentinel:// URL), started once per session when
    asked for."""
    from tests.redis_servers import start_sentinel

    yield from _served(None, start_sentinel)


class _Server(Protocol):
    url: str

    def stop(self) -> None: ...


def _served(
    variable: str | None, start: Callable[[], _Server], program: str | None = None, missing: str = ""
) -> Iterator[str]:
    """The URL an environment variable names (an external server), or else of a server started here for
    the session and stopped after it; the session exits with a clear message if it cannot start one."""
    external = os.environ.get(variable) if variable else None
    if external:
        yield external
        return
    if program is not None and shutil.which(program) is None:
        pytest.exit(missing, returncode=3)
    server = _started(start)
    yield server.url
    server.stop()


@pytest.fixture
def redis_topology(request: pytest.FixtureRequest) -> str:
    """Where this test's QUEUE_REDIS_URL points: SINGLE, or CLUSTER in a `redis_topologies` module's second run."""
    return str(getattr(request, "param", SINGLE))


def _started(start: Callable[[], T]) -> T:
    try:
        return start()
    except ServerUnavailableError as error:
        pytest.exit(str(error), returncode=3)


@dataclass(frozen=True)
class Stores:
    """Where this test's data lives: the URLs and database names its settings point at."""

    redis_url: str  # QUEUE_REDIS_URL: the limiter, the leases, the events
    mongo_url: str
    cache_database: str
    queue_database: str
    broker_url: str | None = None  # CELERY_BROKER_URL, when QUEUE_REDIS_URL cannot be the broker (a cluster)

    def env(self) -> dict[str, str]:
        """The environment a worker process needs to use the same stores."""
        return {
            "QUEUE_REDIS_URL": self.redis_url,
            "CACHE_MONGO_URL": self.mongo_url,
            "QUEUE_MONGO_URL": self.mongo_url,
            "CACHE_MONGO_DATABASE": self.cache_database,
            "QUEUE_MONGO_DATABASE": self.queue_database,
            **({"CELERY_BROKER_URL": self.broker_url} if self.broker_url else {}),
        }

    def redis(self) -> RedisClient:
        """A new client of QUEUE_REDIS_URL's Redis, whichever its topology (close it after use)."""
        return connect(self.redis_url)


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


def dbsize(client: RedisClient) -> int:
    """How many keys the Redis holds (on a cluster, all its masters)."""
    if isinstance(client, redis.Redis):
        return int(client.dbsize())
    return int(client.dbsize(target_nodes=client.PRIMARIES))


def use_settings(monkeypatch: pytest.MonkeyPatch, values: dict[str, str]) -> dict[str, str]:
    """Set these variables for this process's settings (re-read) and return them for the workers it starts:
    the enqueuing process and its workers must share the same settings."""
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    get_config.cache_clear()
    return values


@pytest.fixture
def stores(
    clean_env: pytest.MonkeyPatch, redis_url: str, mongo_url: str, redis_topology: str, request: pytest.FixtureRequest
) -> Iterator[Stores]:
    run = uuid.uuid4().hex[:12]
    databases = f"stepcache_test_{run}_cache", f"stepcache_test_{run}_queue"
    if redis_topology == CLUSTER:
        result = Stores(request.getfixturevalue("redis_cluster_url"), mongo_url, *databases, broker_url=redis_url)
    elif redis_topology == SENTINEL:
        result = Stores(request.getfixturevalue("redis_sentinel_url"), mongo_url, *databases)
    else:
        result = Stores(redis_url, mongo_url, *databases)
    use_settings(clean_env, result.env())
    redis_clients = [result.redis(), *([redis.Redis.from_url(redis_url)] if result.broker_url else [])]
    for client in redis_clients:
        client.flushdb()  # on a cluster, every master's
    yield result
    mongo.close_clients()
    for client in redis_clients:
        client.flushdb()
        client.close()
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
    from celery import _state, current_app

    previous, previous_default = current_app._get_current_object(), _state.default_app
    app = app_for(redis_url)
    try:
        yield app
    finally:
        previous.set_current()
        if previous_default is not None:
            previous_default.set_default()
        app.close()


# Celery's own fixtures, from pytest-celery's plugin (which loads Celery's `celery.contrib.pytest`):
# `celery_app` and `celery_worker` are built from the fixtures below, so every test gets stepcache's app
# for its own settings and stores, and a thread-pool worker of it.


@pytest.fixture
def celery_config(stores: Stores) -> dict[str, Any]:
    """Celery's settings for this test's app (the plugin's `celery_app` is built from them): celeryconfig's,
    for this test's settings, so its broker and result backend are the Redis of its stores."""
    from celeryconfig import celery_settings

    return celery_settings(get_config())


@pytest.fixture(scope="session")
def celery_parameters() -> dict[str, Any]:
    return {"name": "stepcache"}


@pytest.fixture(scope="session")
def celery_includes() -> tuple[str, ...]:
    """The sample steps, registered as a user module would (`celery -A tasks worker -I tests.sample_steps`)."""
    return ("tests.sample_steps",)


@pytest.fixture(scope="session")
def celery_worker_pool() -> str:
    return "threads"


@pytest.fixture(scope="session")
def celery_worker_parameters() -> dict[str, Any]:
    """A thread pool of 4 consuming every queue of the graph; no ping task at start (Celery's `celery.ping`
    would run stepcache's signal handlers and put its events on the test's stream)."""
    return {
        "concurrency": 4,
        "queues": [name.value for name in QueueName],
        "perform_ping_check": False,
        "shutdown_timeout": 30,
    }


@pytest.fixture
def celery_app(celery_app: Celery, celery_includes: tuple[str, ...]) -> Iterator[Celery]:
    """The plugin's app made stepcache's: a task per step of the graph, the sample steps included, its
    worker consuming the queues of the steps it knows (tasks/routing.py), and the process's current and
    default app while the test runs (the queue and `step.delay` publish through it, as through `tasks.app`
    in a user's process); the plugin puts the previous ones back after. The results the test waited on
    unsubscribe while their Redis still runs (else their finalizers try it at exit: 20 retries, and a
    "Retry limit exceeded" after the summary)."""
    from tasks.routing import StepQueues
    from tasks.steps import register_tasks

    for module in celery_includes:
        celery_app.loader.import_task_module(module)
    register_tasks(celery_app)
    celery_app.steps["worker"].add(StepQueues)
    celery_app.set_current()
    celery_app.set_default()
    yield celery_app
    consumer = getattr(celery_app.backend, "result_consumer", None)
    if consumer is not None and getattr(consumer, "subscribed_to", None):
        gc.collect()  # the results no longer used unsubscribe (AsyncResult.__del__)
        consumer.subscribed_to.clear()  # the others (kept by a module...) never will, at exit
        consumer.stop()


@pytest.fixture
def default_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default graph only: the sample steps other tests register would be "missing" for every dataset."""
    import common.processing_graph as graph_module
    import tests.sample_steps  # noqa: F401  (registered now, into the graph replaced here: not into this one)

    monkeypatch.setattr(graph_module, "processing_graph", graph_module.ProcessingGraph(graph_module.DEFAULT_STEPS))
