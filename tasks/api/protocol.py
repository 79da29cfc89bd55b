"""The API's HTTP/1.1 server: uvicorn, with the bounds an exposed server needs and uvicorn lacks.

uvicorn closes an idle keep-alive connection, and answers 503 past `limit_concurrency` connections; but a
client that sends its headers one byte at a time, or opens a connection and sends nothing, holds it
forever. :func:`uvicorn_options` adds a deadline: a request's line and headers arrive within
API_HEADER_TIMEOUT_SECONDS of its first byte (of the connection's opening, for the first request), or the
connection is closed; a client's connections past API_MAX_CONNECTIONS_PER_CLIENT are closed at once (the
peer's address; X-Forwarded-For only from API_TRUSTED_PROXIES). Headers are parsed by h11, which refuses
(400) more than API_MAX_HEADER_BYTES of them, however they are sent (httptools buffers a header of any
size).
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections import Counter
from typing import Any, ClassVar

from uvicorn.protocols.http.h11_impl import H11Protocol

from common.config import ApiConfig, get_config


def client_key(address: str) -> str:
    """Who a client is, for the per-client caps: its IPv4 address, or its IPv6 /64 (one host's share)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    return str(ipaddress.ip_network(f"{ip}/64", strict=False)) if ip.version == 6 else str(ip)


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, whose request headers must arrive within `header_timeout` seconds, and whose
    connections from one client are at most `per_client` (past it, closed at once)."""

    _deadline: asyncio.TimerHandle | None = None
    _client_key: str | None = None
    by_client: ClassVar[Counter[str]] = Counter()  # the process's open connections, by client (one loop)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = get_config().api
        self.header_timeout, self.per_client = settings.header_timeout_seconds, settings.max_connections_per_client

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        key = client_key(self.client[0]) if self.client else "-"
        if self.by_client[key] >= self.per_client:
            transport.close()
            return
        self.by_client[key] += 1
        self._client_key = key
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._awaiting_headers():
            self._arm()
        super().data_received(data)
        if not self._awaiting_headers():
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._client_key is not None:
            self.by_client[self._client_key] -= 1
            if not self.by_client[self._client_key]:
                del self.by_client[self._client_key]
            self._client_key = None
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
    trusted = [proxy.strip() for proxy in settings.trusted_proxies.split(",") if proxy.strip()]
    return {
        "http": BoundedH11Protocol,
        "proxy_headers": bool(trusted),  # uvicorn believes X-Forwarded-For from loopback unless told
        "forwarded_allow_ips": trusted or None,
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "limit_concurrency": settings.max_connections,
        "timeout_keep_alive": settings.keep_alive_seconds,
        "log_config": None,
        "access_log": False,
        "server_header": False,
    }
