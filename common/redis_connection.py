"""The Redis client of this process, for the limiter and the events (Celery keeps its own)."""

from __future__ import annotations

import threading

import redis
from pydantic import SecretStr

SOCKET_TIMEOUT_SECONDS = 10.0
_clients: dict[str, redis.Redis] = {}
_lock = threading.Lock()


def get_redis(url: SecretStr) -> redis.Redis:
    """This process's client for `url`; redis-py's pool makes new connections in a forked child."""
    key = url.get_secret_value()
    with _lock:
        client = _clients.get(key)
        if client is None:
            client = redis.Redis.from_url(
                key,
                socket_timeout=SOCKET_TIMEOUT_SECONDS,
                socket_connect_timeout=SOCKET_TIMEOUT_SECONDS,
                health_check_interval=30,
            )
            _clients[key] = client
    return client


def close_clients() -> None:
    """Close every client of this process (tests, shutdown)."""
    with _lock:
        for client in _clients.values():
            client.close()
        _clients.clear()
