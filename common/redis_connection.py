"""The Redis client of this process, for the limiter and the events (Celery keeps its own).

QUEUE_REDIS_URL names one of three topologies:

    redis://[[user]:password@]host:port[/db]       one Redis (also rediss:// for TLS, unix:///path?db=N)
    redis+cluster://[[user]:password@]host:port[,host:port...]
                                                  a Redis Cluster: some of its nodes (the others are
                                                  discovered), db 0 (rediss+cluster:// for TLS)
    redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db]
                                                  the master of `service`, as its Sentinels name it; the
                                                  password is the master's (Sentinels without one)

A cluster gives a :class:`redis.cluster.RedisCluster`, the others a :class:`redis.Redis` (for Sentinel, one
whose pool asks the Sentinels for the master at each new connection, so a failover is followed).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeAlias
from urllib.parse import unquote, urlsplit

import redis
from pydantic import SecretStr
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException
from redis.sentinel import Sentinel

SOCKET_TIMEOUT_SECONDS = 10.0
SINGLE_SCHEMES = ("redis", "rediss", "unix")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SENTINEL_SCHEMES = ("redis+sentinel",)
REDIS_SCHEMES = (*SINGLE_SCHEMES, *CLUSTER_SCHEMES, *SENTINEL_SCHEMES)

RedisClient: TypeAlias = redis.Redis | RedisCluster
_clients: dict[str, RedisClient] = {}
_lock = threading.Lock()


class Topology(StrEnum):
    SINGLE = "single"
    CLUSTER = "cluster"
    SENTINEL = "sentinel"


@dataclass(frozen=True)
class RedisTarget:
    """What a Redis URL names: its topology and, for a cluster or Sentinels, the nodes to ask first."""

    topology: Topology
    url: str = field(repr=False)  # it may hold the password
    hosts: tuple[tuple[str, int], ...] = ()
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    db: int = 0
    service: str = ""  # Sentinel: the monitored master's name
    tls: bool = False


def parse_redis_url(url: str) -> RedisTarget:
    """The topology a Redis URL names; ValueError with a one-line reason when it names none."""
    scheme = urlsplit(url).scheme
    if scheme in SINGLE_SCHEMES:
        return RedisTarget(Topology.SINGLE, url)
    if scheme not in (*CLUSTER_SCHEMES, *SENTINEL_SCHEMES):
        raise ValueError(f"must be a URL starting with {' or '.join(s + '://' for s in REDIS_SCHEMES)}")
    netloc, _, path = url.removeprefix(f"{scheme}://").partition("/")
    path, _, query = path.partition("?")
    if query:
        raise ValueError(f"a {scheme}:// URL takes no ?options")
    userinfo, _, hostlist = netloc.rpartition("@")
    username, has_password, password = userinfo.partition(":")
    hosts = tuple(_host_port(host, scheme) for host in hostlist.split(","))
    credentials: dict[str, Any] = {
        "username": unquote(username) or None,
        "password": unquote(password) if has_password else None,
    }
    if scheme in CLUSTER_SCHEMES:
        if path.strip("/") not in ("", "0"):
            raise ValueError("a Redis Cluster has database 0 only: no /db after its nodes")
        return RedisTarget(Topology.CLUSTER, url, hosts, tls=scheme.startswith("rediss"), **credentials)
    service, _, db = path.strip("/").partition("/")
    if not service:
        raise ValueError("must name the Sentinels' service: redis+sentinel://host:port[,host:port]/service[/db]")
    if db and not db.isdigit():
        raise ValueError(f"the database after the service must be a number, not {db!r}")
    return RedisTarget(Topology.SENTINEL, url, hosts, db=int(db or 0), service=unquote(service), **credentials)


def _host_port(host: str, scheme: str) -> tuple[str, int]:
    name, _, port = host.rpartition(":")
    if not name or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{scheme}:// takes a comma-separated list of host:port, not {host!r}")
    return name.strip("[]"), int(port)


def connect(url: str) -> RedisClient:
    """A new client for this URL (see the module's docstring for the forms it takes)."""
    target = parse_redis_url(url)
    timeout = SOCKET_TIMEOUT_SECONDS
    if target.topology == Topology.CLUSTER:
        nodes = [ClusterNode(host, port) for host, port in target.hosts]  # type: ignore[no-untyped-call]
        try:
            return RedisCluster(
                startup_nodes=nodes,
                username=target.username,
                password=target.password,
                ssl=target.tls,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
            )
        except RedisClusterException as error:  # it asks its nodes for the slots at once: none answered
            raise redis.ConnectionError(str(error)) from error
    if target.topology == Topology.SENTINEL:
        sentinels = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
        # Typed in some redis-py versions and not in others: called as Any, it type-checks under both.
        make_sentinel: Any = Sentinel
        sentinel = make_sentinel(list(target.hosts), sentinel_kwargs=sentinels)
        master: redis.Redis = sentinel.master_for(
            target.service,
            username=target.username,
            password=target.password,
            db=target.db,
            health_check_interval=30,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )
        return master
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout, health_check_interval=30)


def get_redis(url: SecretStr) -> RedisClient:
    """This process's client for `url`; redis-py's pools make new connections in a forked child."""
    key = url.get_secret_value()
    with _lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = connect(key)
    return client


def close_clients() -> None:
    """Close every client of this process (tests, shutdown)."""
    with _lock:
        for client in _clients.values():
            client.close()
        _clients.clear()


def as_text(value: bytes | str) -> str:
    """A Redis reply as text (clients that do not decode responses give bytes)."""
    return value.decode() if isinstance(value, bytes) else value
