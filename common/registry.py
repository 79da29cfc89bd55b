"""Who is running: every worker and API process registers itself in Redis and renews its record; a process
that dies is gone from the registry within COMMON_REGISTRY_TTL_SECONDS.

A record (:class:`ProcessRecord`) says a process's role, host, pid, Celery node name, queues, concurrency,
the steps a worker can run and the queues of the user's steps it consumes, stepcache's version, metrics
URL and start time. Every record lives in two keys under one hash tag (one slot of a cluster: each script
below is atomic there too, its keys all in KEYS):

    stepcache:{:registry}:processes   hash: process id (role:host:pid) -> its record, as JSON
    stepcache:{:registry}:expiry      sorted set: process id, scored by when its record expires (ms, on
                                     Redis' clock, so the hosts' clocks do not matter)

A :class:`Registration` thread writes its process's whole record every TTL/3 (one script call: the
traffic is O(processes), whatever the jobs do, and a Redis that lost its data has the record back at the
next renewal). Each call drops the records past their expiry, and both keys expire with the last live
record: a fleet that is gone leaves nothing behind. Reading the registry is one script call, O(processes):
no SCAN, whose cost follows every key of the database, jobs' included. A clean shutdown removes the record.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from datetime import datetime
from enum import StrEnum
from functools import cache
from importlib import metadata

from pydantic import BaseModel, ConfigDict, ValidationError

from common.config import get_config
from common.constants import REDIS_PREFIX
from common.redis_connection import RedisClient, get_redis

logger = logging.getLogger(__name__)
# ":" is in no namespace: the registry never shares a hash tag (and a slot, and a key) with a namespace
PROCESSES_KEY = f"{REDIS_PREFIX}:{{:registry}}:processes"
EXPIRY_KEY = f"{REDIS_PREFIX}:{{:registry}}:expiry"
WILDCARD_HOSTS = ("0.0.0.0", "::", "")  # listening on every interface: no address to advertise
RENEWALS_PER_TTL = 3  # a record survives two renewals lost in a row
STOP_TIMEOUT_SECONDS = 5.0  # how long a stopping process waits for a renewal under way

# KEYS[1] the records (hash), KEYS[2] their expiry (sorted set). `prune` drops the records past their
# expiry; `expire_with_the_last` gives both keys the expiry of the record that lives longest.
_PRELUDE = """local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local function prune()
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
    redis.call('HDEL', KEYS[1], id)
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
end
local function expire_with_the_last()
  local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
  if last[2] then
    redis.call('PEXPIREAT', KEYS[1], last[2])
    redis.call('PEXPIREAT', KEYS[2], last[2])
  end
end
"""
# ARGV[1] process id, ARGV[2] its record, ARGV[3] TTL (ms).
REGISTER = (
    _PRELUDE
    + """prune()
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
expire_with_the_last()
return 1"""
)
# ARGV[1] process id.
UNREGISTER = (
    _PRELUDE
    + """redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
prune()
return 1"""
)
# Returns the live records.
LIVE = _PRELUDE + "prune()\nreturn redis.call('HVALS', KEYS[1])"


class Role(StrEnum):
    WORKER = "worker"
    API = "api"


class ProcessRecord(BaseModel):
    """What a process says about itself in the registry."""

    model_config = ConfigDict(frozen=True)

    role: Role
    host: str  # the machine's (or container's) host name
    pid: int
    node: str | None = None  # a worker's Celery node name (name@host): what answers a Celery ping
    queues: tuple[str, ...] = ()
    concurrency: int | None = None
    steps: tuple[str, ...] = ()  # the steps a worker can run (its app's step tasks with a function)
    step_queues: tuple[str, ...] = ()  # the queues of the user's steps it consumes (tasks/routing.py)
    version: str
    metrics_url: str | None = None  # None: no metrics served
    started_at: datetime

    @property
    def process_id(self) -> str:
        return f"{self.role}:{self.host}:{self.pid}"


def this_process(
    role: Role,
    started_at: datetime,
    *,
    node: str | None = None,
    queues: Sequence[str] = (),
    concurrency: int | None = None,
    steps: Sequence[str] = (),
    step_queues: Sequence[str] = (),
    metrics_url: str | None = None,
) -> ProcessRecord:
    """The record of the calling process."""
    return ProcessRecord(
        role=role,
        host=socket.gethostname(),
        pid=os.getpid(),
        node=node,
        queues=tuple(queues),
        concurrency=concurrency,
        steps=tuple(steps),
        step_queues=tuple(step_queues),
        version=stepcache_version(),
        metrics_url=metrics_url,
        started_at=started_at,
    )


@cache
def stepcache_version() -> str:
    try:
        return metadata.version("stepcache")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def metrics_url(listen_host: str, port: int) -> str | None:
    """The URL other machines scrape metrics served on `listen_host`:`port` at (None when `port` is 0: no
    metrics): COMMON_REGISTRY_ADVERTISE_HOST if set, else the listen host, or this host's name when that
    is every interface."""
    if not port:
        return None
    host = get_config().common.registry_advertise_host or (
        socket.gethostname() if listen_host in WILDCARD_HOSTS else listen_host
    )
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"


class Registry:
    """The records of the live processes, in the Redis of QUEUE_REDIS_URL."""

    def __init__(self, client: RedisClient) -> None:
        self._register = client.register_script(REGISTER)
        self._unregister = client.register_script(UNREGISTER)
        self._live = client.register_script(LIVE)

    def register(self, record: ProcessRecord, ttl_seconds: float) -> None:
        """Write (or renew) the record; it lives `ttl_seconds` unless written again."""
        ttl_ms = max(1, round(ttl_seconds * 1000))
        self._register(keys=[PROCESSES_KEY, EXPIRY_KEY], args=[record.process_id, record.model_dump_json(), ttl_ms])

    def unregister(self, record: ProcessRecord) -> None:
        self._unregister(keys=[PROCESSES_KEY, EXPIRY_KEY], args=[record.process_id])

    def live(self) -> list[ProcessRecord]:
        """Every live record, by role, host and pid (a record this version cannot read is left out)."""
        records = []
        for raw in self._live(keys=[PROCESSES_KEY, EXPIRY_KEY], args=[]):
            try:
                records.append(ProcessRecord.model_validate_json(raw))
            except ValidationError as error:
                logger.warning("a registry record could not be read: %s", error)
        return sorted(records, key=lambda record: (record.role, record.host, record.pid))


def get_registry() -> Registry:
    return Registry(get_redis(get_config().queue.redis_url))


class Registration:
    """This process's record, written at once and renewed every TTL/3 by a daemon thread until
    :meth:`stop`, which removes it. `describe` is asked for the record at each renewal (a worker's queues
    may change); a renewal that fails is logged and tried again at the next one."""

    def __init__(
        self, describe: Callable[[], ProcessRecord], registry: Registry | None = None, ttl_seconds: float | None = None
    ) -> None:
        self.describe = describe
        self.registry = registry  # made in the thread: connecting to a cluster may fail, or wait
        self.ttl_seconds = ttl_seconds or get_config().common.registry_ttl_seconds
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._renew, name="stepcache-registration", daemon=True)
        self.record: ProcessRecord | None = None

    def start(self) -> Registration:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self.thread.ident is not None:  # started
            self.thread.join(timeout=STOP_TIMEOUT_SECONDS)
        if self.thread.is_alive():  # a renewal waits on Redis: removing would wait too (the TTL removes it)
            logger.warning("the registry record of this process is left to expire: Redis does not answer")
            return
        if self.record is not None and self.registry is not None:
            try:
                self.registry.unregister(self.record)
            except Exception as error:  # it expires within the TTL anyway
                logger.warning("the registry record of %s was not removed: %r", self.record.process_id, error)

    def _renew(self) -> None:
        every = self.ttl_seconds / RENEWALS_PER_TTL
        while not self.stopping.is_set():
            try:
                self.registry = self.registry or get_registry()
                record = self.describe()
                self.registry.register(record, self.ttl_seconds)
                self.record = record
            except Exception as error:
                logger.warning("this process could not renew its registry record: %r", error)
            self.stopping.wait(every)
