"""MongoDB clients: created lazily, one per URL and process, never shared across a fork.

Celery's prefork pool forks worker children after the parent may have touched MongoDB; a MongoClient
must not cross a fork (its sockets and monitor threads belong to the parent), so a child drops the
parent's clients and makes its own on first use.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

from pydantic import SecretStr
from pymongo import MongoClient
from pymongo.collection import Collection
from pymongo.database import Database

SERVER_SELECTION_TIMEOUT_MS = 10_000
# A stalled server (SIGSTOP, a network partition) fails a call after this long instead of blocking its
# caller for the whole stall; the call is then retried (common.resilience.retry_transient).
SOCKET_TIMEOUT_MS = 10_000
_clients: dict[str, MongoClient[dict[str, Any]]] = {}
_lock = threading.Lock()


def _forget_clients_after_fork() -> None:
    # The parent's clients are unusable here; closing them would touch the parent's sockets.
    global _lock
    _clients.clear()
    _indexing.clear()
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_clients_after_fork)


def get_database(url: SecretStr, database: str) -> Database[dict[str, Any]]:
    """The database on the server at `url`, through this process's client for that URL."""
    key = url.get_secret_value()
    with _lock:
        client = _clients.get(key)
        if client is None:
            client = MongoClient(
                key,
                tz_aware=True,
                serverSelectionTimeoutMS=SERVER_SELECTION_TIMEOUT_MS,
                connectTimeoutMS=SERVER_SELECTION_TIMEOUT_MS,
                socketTimeoutMS=SOCKET_TIMEOUT_MS,
            )
            _clients[key] = client
    return client[database]


IndexMaker = Callable[[Collection[dict[str, Any]]], None]
_indexed: set[tuple[str, str, str]] = set()
_indexing: dict[tuple[str, str, str], threading.Lock] = {}


def get_collection(url: SecretStr, database: str, name: str, create_indexes: IndexMaker) -> Collection[dict[str, Any]]:
    """A collection whose indexes `create_indexes` makes, once per process, on first use."""
    collection = get_database(url, database)[name]
    marker = (url.get_secret_value(), database, name)
    if marker not in _indexed:
        with _lock:
            indexing = _indexing.setdefault(marker, threading.Lock())
        # Its own lock: a stalled server holds up the callers of its collection, never of the others'.
        with indexing:
            if marker not in _indexed:
                create_indexes(collection)
                _indexed.add(marker)
    return collection


def close_clients() -> None:
    """Close every client of this process (tests, shutdown)."""
    with _lock:
        for client in _clients.values():
            client.close()
        _clients.clear()
