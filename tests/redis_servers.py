"""Redis topologies beyond one server, for tests: a three-master Redis Cluster, and a master watched by a
Sentinel. Real `redis-server` processes on free ports of 127.0.0.1, in a temporary directory; stopped by
the process ids this module started."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis

from tasks.embedded import STARTUP_TIMEOUT_SECONDS, EmbeddedServer, ServerUnavailableError, free_port, start_redis

CLUSTER_MASTERS = 3


@dataclass
class RedisGroup:
    """Servers started together, and the URL stepcache reaches them by."""

    url: str
    servers: list[EmbeddedServer]
    directory: Path
    ports: list[int] = field(default_factory=list)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def _redis_server(name: str, arguments: Sequence[str], port: int) -> EmbeddedServer:
    binary = shutil.which("redis-server")
    if binary is None:
        raise ServerUnavailableError("redis-server not found on PATH: apt-get install redis-server")
    process = subprocess.Popen([binary, *arguments], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = EmbeddedServer(name, f"redis://127.0.0.1:{port}/0", process)
    client = redis.Redis(port=port, socket_timeout=1)
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    try:
        while True:
            try:
                client.ping()
                return server
            except redis.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    server.stop()
                    raise ServerUnavailableError(f"{name} on port {port} did not start") from None
                time.sleep(0.05)
    finally:
        client.close()


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise ServerUnavailableError(f"{what}: not within {STARTUP_TIMEOUT_SECONDS:.0f}s")
        time.sleep(0.1)


def start_cluster(masters: int = CLUSTER_MASTERS) -> RedisGroup:
    """`masters` redis-servers with `cluster-enabled yes`, joined by `redis-cli --cluster create` (no
    replicas); the URL is `redis+cluster://` with every node."""
    directory = Path(tempfile.mkdtemp(prefix="stepcache-cluster-"))
    ports = [free_port() for _ in range(masters)]
    group = RedisGroup("redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in ports), [], directory, ports)
    try:
        for port in ports:
            arguments = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory), "--save", ""]
            arguments += ["--appendonly", "no", "--cluster-enabled", "yes", "--cluster-node-timeout", "5000"]
            # The cluster bus port defaults to port + 10000, past 65535 for the high free ports: name one.
            arguments += ["--cluster-config-file", f"nodes-{port}.conf", "--cluster-port", str(free_port())]
            group.servers.append(_redis_server(f"redis-server (cluster node {port})", arguments, port))
        nodes = [f"127.0.0.1:{port}" for port in ports]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=STARTUP_TIMEOUT_SECONDS,
        )

        def every_node_sees_it_ok() -> bool:
            for port in ports:
                with redis.Redis(port=port) as client:
                    info = client.execute_command("CLUSTER INFO")  # parsed into a dict of strings
                    if info.get("cluster_state") != "ok" or int(info.get("cluster_known_nodes", 0)) != masters:
                        return False
            return True

        _wait_for(every_node_sees_it_ok, "the cluster's nodes agree")
    except BaseException:
        group.stop()
        raise
    return group


def start_sentinel(service: str = "mymaster") -> RedisGroup:
    """One master and one `redis-server --sentinel` monitoring it (quorum 1); the URL is
    `redis+sentinel://127.0.0.1:SENTINEL_PORT/service`."""
    directory = Path(tempfile.mkdtemp(prefix="stepcache-sentinel-"))
    master = start_redis()
    sentinel_port = free_port()
    master_port = int(master.url.rsplit(":", 1)[1].split("/")[0])
    group = RedisGroup(f"redis+sentinel://127.0.0.1:{sentinel_port}/{service}", [master], directory)
    group.ports = [master_port, sentinel_port]
    try:
        config = directory / "sentinel.conf"  # Sentinel rewrites its config file: it must be its own
        config.write_text(
            f"port {sentinel_port}\nbind 127.0.0.1\ndir {directory}\n"
            f"sentinel monitor {service} 127.0.0.1 {master_port} 1\n"
            f"sentinel down-after-milliseconds {service} 5000\n"
        )
        group.servers.append(_redis_server("redis-sentinel", [str(config), "--sentinel"], sentinel_port))

        def sentinel_names_the_master() -> bool:
            with redis.Redis(port=sentinel_port) as client:
                address = client.execute_command("SENTINEL GET-MASTER-ADDR-BY-NAME", service)
            return bool(address) and int(address[1]) == master_port

        _wait_for(sentinel_names_the_master, "the Sentinel names the master")
    except BaseException:
        group.stop()
        raise
    return group


class SnapshotRedis:
    """One redis-server keeping RDB snapshots in `directory` (Redis' default persistence, saved on demand
    here): `kill_and_restart` SIGKILLs it and starts it again on the same port, from its last snapshot."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.server = self._start()

    def _start(self) -> EmbeddedServer:
        arguments = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory)]
        arguments += ["--save", "", "--appendonly", "no", "--dbfilename", "dump.rdb"]
        return _redis_server("redis-server (snapshots)", arguments, self.port)

    def save(self) -> None:
        with redis.Redis(port=self.port) as client:
            client.save()

    def kill_and_restart(self) -> None:
        self.server.process.kill()
        self.server.process.wait()
        self.server = self._start()

    def stop(self) -> None:
        self.server.stop()
