"""Whether Redis is as the ledger left it: the epoch markers and the generation.

An epoch marker on every master says that Redis kept its data since the last repair; its absence, that
Redis lost it (a flush, a restart without persistence) or is new. A marker is not enough: a Redis restarted
from its snapshot (Redis' default persistence), or a replica promoted before it caught up with its master,
holds the marker and an older state. So every write of the journals to the ledger (common/queue/journal.py)
advances a generation on every master, then records it in MongoDB (collection `redisGenerations`, one
document per master's hash tag, only ever forward): a Redis whose generation is behind MongoDB's, or as
far along another history, forgot writes the ledger depends on, and is repaired from it as after a loss
(`Queue.repair`).

Who finds out, and how soon: the write that advances a rolled-back generation finds MongoDB's as new or
newer (at most QUEUE_LEDGER_LAG_SECONDS after the first decision on the rolled-back Redis, or at once for
a start the ledger refuses, which writes its journal then); the reaper compares both on every pass (one
WORKER_HEARTBEAT_INTERVAL_SECONDS, for a Redis on which nothing happens); an attempt that finds its lease
gone compares them before it gives up.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from pymongo.collection import Collection
from pymongo.errors import DuplicateKeyError

from common.config import get_config
from common.constants import GENERATIONS_COLLECTION
from common.mongo import get_collection
from common.redis_cluster import all_exist, node_hash_tags
from common.redis_connection import RedisClient, as_text
from common.resilience import retry_transient

logger = logging.getLogger(__name__)
STEPCACHE_TAG = "stepcache"
EPOCH_KEY = "{stepcache}:epoch"  # the marker on a single Redis (epoch_keys: one per master)
# A generation is "count:nonce": the count says how far, the nonce which history (a Redis that rolled back
# and advanced as far again has the same count and another nonce). KEYS[1] the generation; ARGV[1] a nonce.
ADVANCE = """local current = redis.call('GET', KEYS[1]) or '0:'
local count = tonumber(string.match(current, '^(%d+)')) + 1
local generation = count .. ':' .. ARGV[1]
redis.call('SET', KEYS[1], generation)
return generation"""
# After a repair: the generation MongoDB recorded (ARGV[1]), unless Redis went past it meanwhile.
CATCH_UP = """local current = redis.call('GET', KEYS[1]) or '0:'
if tonumber(string.match(current, '^(%d+)')) < tonumber(string.match(ARGV[1], '^(%d+)')) then
  redis.call('SET', KEYS[1], ARGV[1])
end
return 1"""


def epoch_keys(client: RedisClient) -> list[tuple[str, str]]:
    """(repairing, epoch) keys of every master: `{stepcache}:repairing` and `{stepcache}:epoch` on one
    Redis; on a cluster, a pair on each master, since each of them fails over, and may lose its data, on
    its own."""
    return [(f"{{{tag}}}:repairing", f"{{{tag}}}:epoch") for tag in node_hash_tags(client, STEPCACHE_TAG)]


def epoch_markers(client: RedisClient) -> list[str]:
    """The epoch marker of every master: all there, Redis kept its data since the last repair."""
    return [epoch for _, epoch in epoch_keys(client)]


def _generation_key(tag: str) -> str:
    return f"{{{tag}}}:generation"


def _parse(generation: bytes | str | None) -> tuple[int, str]:
    count, _, nonce = as_text(generation or "0:").partition(":")
    return int(count), nonce


def generations_collection() -> Collection[dict[str, Any]]:
    settings = get_config().queue
    return get_collection(settings.mongo_url, settings.mongo_database, GENERATIONS_COLLECTION, lambda _: None)


class Generation:
    """Each master's generation, in Redis and as MongoDB last recorded it."""

    def __init__(self, client: RedisClient, collection: Collection[dict[str, Any]] | None = None) -> None:
        self.redis = client
        self.collection = collection if collection is not None else generations_collection()
        self._advance = client.register_script(ADVANCE)
        self._catch_up = client.register_script(CATCH_UP)

    def tags(self) -> list[str]:
        return node_hash_tags(self.redis, STEPCACHE_TAG)

    @retry_transient
    def recorded(self) -> dict[str, tuple[int, str]]:
        """MongoDB's generation of each master it knows."""
        return {document["_id"]: (document["count"], document["nonce"]) for document in self.collection.find({})}

    def _current(self, tags: list[str]) -> list[tuple[int, str]]:
        pipe = self.redis.pipeline(transaction=False)
        for tag in tags:
            pipe.get(_generation_key(tag))
        return [_parse(value) for value in pipe.execute()]

    @retry_transient
    def advance(self) -> bool:
        """After a write to the ledger: advance every master's generation and record it in MongoDB; False
        when a master is found behind MongoDB's record (it rolled back: repair it)."""
        tags = self.tags()
        advanced = [_parse(self._advance(keys=[_generation_key(tag)], args=[uuid.uuid4().hex[:12]])) for tag in tags]
        recorded = [self._record(tag, count, nonce) for tag, (count, nonce) in zip(tags, advanced, strict=True)]
        # Recorded: MongoDB had seen less of every master than it has now; otherwise, look closer.
        return all(recorded) or not self.behind()

    @retry_transient
    def _record(self, tag: str, count: int, nonce: str) -> bool:
        """Record a master's generation unless MongoDB has one as far or further (False)."""
        try:
            self.collection.update_one(
                {"_id": tag, "count": {"$lt": count}}, {"$set": {"count": count, "nonce": nonce}}, upsert=True
            )
        except DuplicateKeyError:
            return False
        return True

    def behind(self) -> bool:
        """Whether a master forgot a generation MongoDB recorded: its count is behind, or as far with
        another nonce (another history). MongoDB is read first: a write in between only moves Redis on."""
        recorded = self.recorded()
        tags = self.tags()
        for tag, (count, nonce) in zip(tags, self._current(tags), strict=True):
            seen_count, seen_nonce = recorded.get(tag, (0, ""))
            if count < seen_count or (count == seen_count and count > 0 and nonce != seen_nonce):
                logger.error(
                    "Redis (%s) is at generation %s:%s, the ledger saw %s:%s", tag, count, nonce, *recorded[tag]
                )
                return True
        return False

    def catch_up(self) -> None:
        """After a repair: every master at the generation MongoDB recorded, at least."""
        recorded = self.recorded()
        for tag in self.tags():
            count, nonce = recorded.get(tag, (0, ""))
            self._catch_up(keys=[_generation_key(tag)], args=[f"{count}:{nonce}"])


def kept_its_data(client: RedisClient) -> bool:
    """Whether every master has its epoch marker (one round trip)."""
    return all_exist(client, epoch_markers(client))
