"""Whether the servers a command needs answer, within a bound: the CLI's first step.

Left to themselves, the clients wait long for a server that is down: pymongo's server selection takes
10 s and the cache's reads retry it five times (about a minute), and a Redis that accepts connections
but does not answer costs its socket timeout on each retry. The CLI pings each server it needs first,
all at once, and stops after REACH_TIMEOUT_SECONDS (and a second) at most with one line (exit 3) instead.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial

import pymongo
from celery import Celery
from pydantic import SecretStr

from common.config import get_config, mask_url
from common.exceptions import ServerUnreachableError

REACH_TIMEOUT_SECONDS = 5.0


class Server(StrEnum):
    REDIS = "Redis"  # QUEUE_REDIS_URL: the limiter, the leases, the events
    MONGODB = "MongoDB"  # CACHE_MONGO_URL and QUEUE_MONGO_URL: the cache and the ledger
    BROKER = "broker"  # Celery's (CELERY_BROKER_URL, or QUEUE_REDIS_URL): where jobs are published


@dataclass
class Ping:
    """One server's ping, run in a daemon thread: a client stuck on a silent server is left behind, and
    never waited for at exit."""

    name: str  # the server and its URL, password masked
    call: Callable[[], object]
    failure: str | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        threading.Thread(target=self._run, name="stepcache-ping", daemon=True).start()

    def _run(self) -> None:
        try:
            self.call()
        except Exception as error:
            reason = str(error).split(" (configured timeouts", 1)[0]  # pymongo's long tail
            self.failure = f"{type(error).__name__}: {' '.join(reason.split())[:200]}"
        finally:
            self.done.set()


def check_reachable(servers: Collection[Server], timeout: float = REACH_TIMEOUT_SECONDS) -> None:
    """Every URL of these servers answers a ping within `timeout` seconds, or ServerUnreachableError names
    the first one (in the order given) that refused or did not answer."""
    pings = [ping for server in servers for ping in _pings(server, timeout)]
    for ping in pings:
        ping.start()
    # pymongo and kombu bound themselves by `timeout`: a second more lets them say why they gave up.
    deadline = time.monotonic() + timeout + 1
    for ping in pings:
        if not ping.done.wait(max(0.0, deadline - time.monotonic())):
            raise ServerUnreachableError(f"{ping.name} did not answer within {timeout:g} s")
        if ping.failure is not None:
            raise ServerUnreachableError(f"{ping.name} could not be reached: {ping.failure}")


def _pings(server: Server, timeout: float) -> list[Ping]:
    settings = get_config()
    if server == Server.REDIS:
        url = settings.queue.redis_url
        return [Ping(f"Redis at {mask_url(url.get_secret_value())}", lambda: _ping_redis(url))]
    if server == Server.MONGODB:
        stores = {(s.mongo_url.get_secret_value(), s.mongo_database) for s in (settings.cache, settings.queue)}
        return [
            Ping(f"MongoDB at {mask_url(url)}", partial(_ping_mongo, url, database, timeout))
            for url, database in sorted(stores)
        ]
    from tasks.queue import stepcache_app

    app = stepcache_app()  # found here: Celery's current app is per thread
    return [Ping(f"the broker at {mask_url(str(app.conf.broker_url))}", partial(_ping_broker, app, timeout))]


def _ping_redis(url: SecretStr) -> object:
    from common.redis_connection import get_redis

    return get_redis(url).ping()


def _ping_mongo(url: str, database: str, timeout: float) -> object:
    from common.mongo import get_database

    with pymongo.timeout(timeout):  # bounds the server selection too
        return get_database(SecretStr(url), database).command("ping")


def _ping_broker(app: Celery, timeout: float) -> object:
    with app.connection_for_write() as connection:
        return connection.ensure_connection(max_retries=1, interval_start=0, timeout=timeout)
