"""What a Redis Cluster changes in stepcache's own Redis calls, in one place.

Every key of one namespace shares the hash tag `{namespace}`: one slot, so one node, where each limiter
script runs atomically. What spans namespaces (the reaper's scripts, `top`'s reads) or touches the few
global keys (`stepcache:active`, `stepcache:limits`, the event streams, the locks) spreads over nodes.
redis-py's cluster pipeline sends each node its commands, all nodes at once (one round trip per node),
but refuses EVALSHA and TIME, and cannot be a transaction across slots; these helpers give the limiter,
the event bus and the epoch check one code path for a single Redis and a cluster:

    ScriptBatch        scripts and commands in one pipeline (EVALSHA, no SCRIPT EXISTS; NOSCRIPT reloaded)
    add_time           TIME in a pipeline, from the node holding a given key
    server_time        TIME from the node holding a given key
    node_hash_tags     a hash tag per master, for a marker each master must hold (the epoch)
    all_exist          whether every key exists, one round trip per node
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from redis.client import Pipeline
from redis.cluster import ClusterPipeline, RedisCluster
from redis.commands.core import Script
from redis.exceptions import NoScriptError

from common.redis_connection import RedisClient

# How many candidate tags `node_hash_tags` tries: a master owning a few slots only may need many.
MAX_TAG_CANDIDATES = 100_000


def is_cluster(client: RedisClient | Pipeline | ClusterPipeline) -> bool:
    return isinstance(client, RedisCluster)  # a ClusterPipeline is one too


class ScriptBatch:
    """Scripts and plain commands sent in one pipeline: one round trip on a single Redis; on a cluster,
    one per node that holds their keys, all at once. Results come back in the order they were added.
    Commands sent to different nodes run in no given order between them.

    Scripts go as EVALSHA, without asking Redis first whether it has them (redis-py's pipelines send
    SCRIPT EXISTS before every batch with a script: a round trip each). A script Redis lacks (new,
    restarted, failed over, its scripts flushed) answers NOSCRIPT without running: it then runs alone,
    which loads it, and the plain commands queued after it run again after it, so that the batch's order
    holds (a batch holds only commands safe to repeat: SADDs, reads, events delivered at least once)."""

    def __init__(self, client: RedisClient) -> None:
        self.client = client
        self.pipe: Pipeline | ClusterPipeline = client.pipeline(transaction=False)
        self._scripts: dict[int, tuple[Script, list[Any], list[Any]]] = {}

    def script(self, script: Script, keys: Sequence[Any], args: Sequence[Any]) -> None:
        keys, args = list(keys), list(args)
        pipe: Any = self.pipe  # redis-py's cluster module is untyped
        self._scripts[len(pipe)] = (script, keys, args)
        if is_cluster(self.client):
            # `evalsha` is blocked in cluster pipelines, and the pipeline would ask a node for the keys of
            # each EVALSHA (COMMAND GETKEYS, a round trip each): name the node of its keys. A MOVED answer
            # (the slot moved meanwhile) is retried alone, routed by the keys.
            node = pipe.get_node_from_key(keys[0])
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args, target_nodes=node)
        else:
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)

    def execute(self) -> list[Any]:
        pipe: Any = self.pipe
        # A cluster pipeline keeps its commands in its execution strategy (redis-py 6+).
        queued = pipe._execution_strategy.command_queue if is_cluster(self.client) else pipe.command_stack
        commands = [_command(entry) for entry in queued]
        results: list[Any] = pipe.execute(raise_on_error=False)
        missing = [position for position, result in enumerate(results) if isinstance(result, NoScriptError)]
        for position in range(missing[0] if missing else len(results), len(results)):
            if position in self._scripts:
                if isinstance(results[position], NoScriptError):
                    script, keys, args = self._scripts[position]
                    results[position] = script(keys=keys, args=args)  # it had not run: it runs once
            else:
                command, options = commands[position]
                client: Any = self.client
                results[position] = client.execute_command(*command, **options)
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results


def _command(entry: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A queued command's arguments and options (a pipeline's stack holds tuples, a cluster pipeline's
    objects)."""
    if isinstance(entry, tuple):
        return entry[0], entry[1]
    return entry.args, entry.options


def add_time(pipe: Pipeline | ClusterPipeline, key: str) -> None:
    """Queue TIME in the pipeline; on a cluster, from the node that holds `key` (its scripts' clock)."""
    if isinstance(pipe, ClusterPipeline):
        cluster_pipe: Any = pipe  # redis-py's cluster module is untyped
        cluster_pipe.execute_command("TIME", target_nodes=cluster_pipe.get_node_from_key(key))
    else:
        pipe.time()


def server_time(client: RedisClient, key: str) -> tuple[int, int]:
    """(seconds, microseconds) on the clock of the node that holds `key`."""
    if isinstance(client, RedisCluster):
        cluster: Any = client  # redis-py's cluster module is untyped
        seconds, microseconds = cluster.execute_command("TIME", target_nodes=cluster.get_node_from_key(key))
    else:
        seconds, microseconds = client.time()
    return int(seconds), int(microseconds)


def node_of(client: RedisClient, key: str) -> str:
    """The name of the node that holds `key` (one name for a single Redis)."""
    cluster: Any = client  # redis-py's cluster module is untyped
    return str(cluster.get_node_from_key(key).name) if isinstance(client, RedisCluster) else ""


def node_hash_tags(client: RedisClient, tag: str) -> list[str]:
    """Hash tags, one per master, so that a key named with each lands on every master: `tag` itself
    (the only one on a single Redis), then `tag:1`, `tag:2`... for masters `tag` does not land on. After
    slots moved between masters, the tags are others: markers under them are missing, as after a loss."""
    if not isinstance(client, RedisCluster):
        return [tag]
    cluster: Any = client  # redis-py's cluster module is untyped
    masters = {node.name for node in cluster.get_primaries()}
    tags: dict[str, str] = {}
    for candidate in itertools.chain([tag], (f"{tag}:{i}" for i in range(1, MAX_TAG_CANDIDATES))):
        tags.setdefault(node_of(client, f"{{{candidate}}}"), candidate)
        if masters <= tags.keys():
            break
    return [tags[name] for name in sorted(tags)]


def all_exist(client: RedisClient, keys: Sequence[str]) -> bool:
    """Whether every key exists; one round trip (per node, all at once, on a cluster)."""
    if not isinstance(client, RedisCluster):
        return int(client.exists(*keys)) == len(keys)
    cluster: Any = client  # redis-py's cluster module is untyped
    pipe = cluster.pipeline()
    for key in keys:
        pipe.exists(key)
    return all(pipe.execute())
