"""A real uvicorn server of the API on a free loopback port, in a thread of the test process (it shares
the test's settings: the `stores` databases), and an httpx client of it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn

from common.config import get_config
from tasks.api import create_api
from tasks.api.protocol import uvicorn_options
from tasks.embedded import free_port


@contextmanager
def api_server() -> Iterator[str]:
    """Serve the API (built from the current settings) until the block ends; yields its base URL."""
    port = free_port()
    settings = get_config()
    config = uvicorn.Config(create_api(settings), host="127.0.0.1", port=port, **uvicorn_options(settings.api))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the API server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def api_client() -> Iterator[httpx.Client]:
    with api_server() as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client
