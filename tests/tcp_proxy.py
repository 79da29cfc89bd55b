"""A TCP proxy on loopback that a test controls: it forwards every connection to a target, and `cut()`
resets every live one at once (both sides, mid-command), as a network partition or a load balancer would.

Threads and blocking sockets: one thread accepts, two pump bytes per connection. A connection that
cannot reach the target (it is down, restarting) is reset at once.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from types import TracebackType

ACCEPT_POLL_SECONDS = 0.2
CONNECT_TIMEOUT_SECONDS = 2.0
CHUNK = 65536


def _abort(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0), waking a thread blocked in recv on it first."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)
    sock.close()


class TcpProxy:
    """`with TcpProxy("127.0.0.1", port) as proxy:` listens on 127.0.0.1:`proxy.port`."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(ACCEPT_POLL_SECONDS)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._live: list[tuple[socket.socket, socket.socket]] = []
        self._stopping = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, name="tcp-proxy-accept", daemon=True)
        self.accepted = 0
        self.cut_connections = 0

    def start(self) -> TcpProxy:
        self._acceptor.start()
        return self

    def live_connections(self) -> int:
        with self._lock:
            return len(self._live)

    def cut(self) -> int:
        """Reset every live connection, client and target side; returns how many were cut."""
        with self._lock:
            pairs, self._live = self._live, []
            self.cut_connections += len(pairs)
        for client, upstream in pairs:
            _abort(client)
            _abort(upstream)
        return len(pairs)

    def stop(self) -> None:
        """Stop accepting, reset what is live, and wait for the accepting thread."""
        self._stopping.set()
        if self._acceptor.is_alive():
            self._acceptor.join(timeout=5)
        self._listener.close()
        self.cut()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self.target, timeout=CONNECT_TIMEOUT_SECONDS)
                upstream.settimeout(None)
            except OSError:
                _abort(client)
                continue
            pair = (client, upstream)
            with self._lock:
                self._live.append(pair)
                self.accepted += 1
            for source, sink in (pair, pair[::-1]):
                threading.Thread(target=self._pump, args=(source, sink, pair), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, pair: tuple[socket.socket, socket.socket]) -> None:
        try:
            while data := source.recv(CHUNK):
                sink.sendall(data)
        except OSError:
            pass
        # Either side closed or failed: the other one goes too, as it would through a real network.
        with self._lock:
            if pair not in self._live:
                return  # cut() or the other pump closes it
            self._live.remove(pair)
        _abort(pair[0])
        _abort(pair[1])

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
