"""The API's HTTP/1.1 server: uvicorn, with the bounds an exposed server needs and uvicorn lacks.

uvicorn closes an idle keep-alive connection, and answers 503 past `limit_concurrency` connections; but a
client that sends its headers one byte at a time, or opens a connection and sends nothing, holds it
forever. :func:`uvicorn_options` adds a deadline: a request's line and headers arrive within
API_HEADER_TIMEOUT_SECONDS of its first byte (of the connection's opening, for the first request), or the
connection is closed. Headers are parsed by h11, which refuses (400) more than API_MAX_HEADER_BYTES of
them, however they are sent (httptools buffers a header of any size).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from common.config import ApiConfig, get_config


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, whose request headers must arrive within `header_timeout` seconds."""

    _deadline: asyncio.TimerHandle | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = get_config().api.header_timeout_seconds

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._awaiting_headers():
            self._arm()
        super().data_received(data)
        if not self._awaiting_headers():
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _awaiting_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.header_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self._awaiting_headers() and not self.transport.is_closing():
            self.transport.close()


def uvicorn_options(settings: ApiConfig) -> dict[str, Any]:
    """uvicorn's options for the API (`uvicorn.run`, `uvicorn.Config`), with the process's settings."""
    return {
        "http": BoundedH11Protocol,
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "limit_concurrency": settings.max_connections,
        "timeout_keep_alive": settings.keep_alive_seconds,
        "log_config": None,
        "access_log": False,
        "server_header": False,
    }
