"""The event bus: stepcache's events on one Redis Stream.

Broadcast
    :meth:`EventBus.read` / :meth:`EventBus.subscribe` give every reader every event, from now or from a
    given stream id. Readers hold no state in Redis.
Anycast
    A :class:`Consumer` belongs to a consumer group: each event is handled by one consumer of the group,
    acknowledged only after its handlers returned, reclaimed (XAUTOCLAIM) from a consumer that died or
    failed after `claim_idle_ms`, and moved to the dead-letter stream once delivered `max_deliveries`
    times, or when no handler of the group takes its type: an event is never silently dropped.
A job's own events
    Every event of a job (its `job.*`, `cache.updated` and `task.*` events) also goes to the job's own
    stream (:meth:`EventBus.job_stream`, in the same round trip): following one job reads only its events
    (:meth:`EventBus.read_job`), whatever else happens. It keeps the job's last JOB_STREAM_MAX_LENGTH
    events or so, and expires JOB_STREAM_TTL_SECONDS after its last one: its cost follows active jobs.
Length
    The stream is trimmed to about `max_length` entries, but never past an entry that a live consumer
    group has not acknowledged or not read yet: a lagging group makes the stream longer, not lossy. A
    group none of whose consumers read for `group_idle_ms` is abandoned (a removed service): it no longer
    holds trimming back, so the stream stays at about `max_length` entries plus what live groups hold.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from common.constants import REDIS_PREFIX
from common.events import Event, InvalidEventError, parse_event
from common.redis_cluster import is_cluster, server_time
from common.redis_connection import RedisClient, as_text

logger = logging.getLogger(__name__)
EVENTS_STREAM = f"{REDIS_PREFIX}:events"
DEAD_LETTER_SUFFIX = ":dead"
DEFAULT_MAX_LENGTH = 100_000
DEFAULT_GROUP_IDLE_MS = 3_600_000  # above claim_idle_ms and any handler's run, when a live consumer reads nothing
TRIM_EVERY = 100
JOB_STREAM_MAX_LENGTH = 1_000
JOB_STREAM_TTL_SECONDS = 3_600
Handler = Callable[[Event], None]


def _id_key(stream_id: str) -> tuple[int, int]:
    milliseconds, _, sequence = stream_id.partition("-")
    return int(milliseconds), int(sequence or 0)


class EventBus:
    """Publish and read events on one stream."""

    def __init__(
        self,
        client: RedisClient,
        stream: str = EVENTS_STREAM,
        max_length: int = DEFAULT_MAX_LENGTH,
        group_idle_ms: int = DEFAULT_GROUP_IDLE_MS,
    ):
        # redis-py's stream replies are typed loosely; this module knows their shapes.
        self.redis: Any = client
        self.stream = stream
        self.dead_letter_stream = stream + DEAD_LETTER_SUFFIX
        self.max_length = max_length
        self.group_idle_ms = group_idle_ms
        self._published = 0

    def publish(self, event: Event) -> str:
        """Append the event; returns its stream id."""
        return self.publish_many([event])[0]

    def publish_many(self, events: Sequence[Event]) -> list[str]:
        """Append the events, in order, in one round trip; returns their stream ids."""
        pipe = self.redis.pipeline(transaction=False)
        positions = self.add(pipe, events)
        results = pipe.execute()
        return [as_text(results[position]) for position in positions]

    def add(self, pipe: Any, events: Sequence[Event]) -> list[int]:
        """Append the events to a pipeline the caller sends (with its own commands: one round trip), and to
        their jobs' streams; returns the positions in the pipeline of the commands that add them to the
        stream."""
        positions = []
        for event in events:
            data = {"event": event.model_dump_json()}
            positions.append(len(pipe))
            pipe.xadd(self.stream, data)
            if event.job_id is not None and event.namespace is not None:
                job_stream = self.job_stream(event.job_id, event.namespace)
                pipe.xadd(job_stream, data, maxlen=JOB_STREAM_MAX_LENGTH, approximate=True)
                pipe.expire(job_stream, JOB_STREAM_TTL_SECONDS)
        before, self._published = self._published, self._published + len(events)
        if before // TRIM_EVERY != self._published // TRIM_EVERY:
            self.trim()
        return positions

    def job_stream(self, job_id: str, namespace: str) -> str:
        """The key of the job's own stream (on its namespace's slot)."""
        return f"{self.stream}:job:{{{namespace}}}:{job_id}"

    def read_job(
        self, job_id: str, namespace: str, after: str = "0-0", count: int = 100, block_ms: int | None = None
    ) -> list[tuple[str, Event]]:
        """The job's events after the stream id `after` (of its own stream), waiting up to `block_ms` for one."""
        return self._parsed(self.redis.xread({self.job_stream(job_id, namespace): after}, count=count, block=block_ms))

    def last_job_id(self, job_id: str, namespace: str) -> str:
        """The id of the job's newest event ('0-0' when it has none): read after it for what comes next."""
        newest = self.redis.xrevrange(self.job_stream(job_id, namespace), count=1)
        return as_text(newest[0][0]) if newest else "0-0"

    def last_id(self) -> str:
        """The id of the newest entry ('0-0' for an empty stream): read after it to get what comes next."""
        newest = self.redis.xrevrange(self.stream, count=1)
        return as_text(newest[0][0]) if newest else "0-0"

    def read(self, after: str = "$", count: int = 100, block_ms: int | None = None) -> list[tuple[str, Event]]:
        """Events after the stream id `after` ('$': only new ones), waiting up to `block_ms` for one."""
        return self._parsed(self.redis.xread({self.stream: after}, count=count, block=block_ms))

    @staticmethod
    def _parsed(answer: Any) -> list[tuple[str, Event]]:
        entries = answer[0][1] if answer else []
        events = []
        for stream_id, fields in entries:
            try:
                events.append((as_text(stream_id), parse_event(fields[b"event"])))
            except (InvalidEventError, KeyError):
                logger.warning("skipping stream entry %s that is not an event", stream_id)
        return events

    def subscribe(self, after: str | None = None, block_ms: int = 1000) -> Iterator[tuple[str, Event]]:
        """Every event from `after` (default: from now on), forever; the caller stops iterating."""
        position = after if after is not None else self.last_id()
        while True:
            for stream_id, event in self.read(position, block_ms=block_ms):
                position = stream_id
                yield stream_id, event

    def trim(self) -> int:
        """Trim to about max_length entries, never past an entry a live group has not acknowledged or read.

        An abandoned group (see :meth:`abandoned`) that would hold the trim back is detached: ignored, with
        a warning naming it at every trim it is ignored by. It is kept, not destroyed, so a consumer that
        comes back resumes where the group was; the entries trimmed meanwhile are lost to it, and those it
        had pending leave its pending list at its first XAUTOCLAIM.
        """
        excess = int(self.redis.xlen(self.stream)) - self.max_length
        if excess <= 0:
            return 0
        cutoff = as_text(self.redis.xrange(self.stream, "-", "+", count=excess + 1)[-1][0])
        for group in self.redis.xinfo_groups(self.stream):
            name = as_text(group["name"])
            milliseconds, sequence = _id_key(as_text(group["last-delivered-id"]))
            keep_from = f"{milliseconds}-{sequence + 1}"  # the group has not read what comes after
            pending = self.redis.xpending(self.stream, name)
            if pending["pending"]:
                keep_from = min(keep_from, as_text(pending["min"]), key=_id_key)
            if _id_key(keep_from) >= _id_key(cutoff):
                continue
            if self.abandoned(name, keep_from):
                logger.warning("event group %r is abandoned: trimming %s past what it has not read", name, self.stream)
                continue
            cutoff = keep_from
        return int(self.redis.xtrim(self.stream, minid=cutoff, approximate=False))

    def abandoned(self, group: str, held_from: str = "0-0") -> bool:
        """Whether none of the group's consumers read or claimed for `group_idle_ms`.

        A consumer's `idle` counts from its last read or claim (before Redis 7.2: the last that got
        entries; `inactive`, from 7.2, always counts so and is not needed). A live consumer of a group that
        holds the trim back has entries to read, or pending ones to claim after `claim_idle_ms`: so keep
        `group_idle_ms` above `claim_idle_ms` and the longest handler run. Redis records neither when a
        group was created nor when its last consumer was deleted: a group without consumers is abandoned
        once the first entry it holds (from the stream id `held_from`) is older than `group_idle_ms`.
        """
        consumers = self.redis.xinfo_consumers(self.stream, group)
        if consumers:
            return min(int(consumer["idle"]) for consumer in consumers) > self.group_idle_ms
        first_held = self.redis.xrange(self.stream, held_from, "+", count=1)
        if not first_held:
            return False
        seconds, microseconds = server_time(self.redis, self.stream)
        now_ms = seconds * 1000 + microseconds // 1000  # the clock of the stream's server, which its ids come from
        return now_ms - _id_key(as_text(first_held[0][0]))[0] > self.group_idle_ms

    def dead_letters(self, count: int = 100) -> list[tuple[str, dict[str, str]]]:
        """The newest entries of the dead-letter stream: the event's JSON, its reason and its group."""
        entries = self.redis.xrevrange(self.dead_letter_stream, count=count)
        return [(as_text(i), {as_text(k): as_text(v) for k, v in fields.items()}) for i, fields in entries]


@dataclass
class Consumer:
    """One consumer of a group: each event of the stream goes to one consumer of the group."""

    bus: EventBus
    group: str
    name: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    max_deliveries: int = 5
    claim_idle_ms: int = 30_000
    handlers: dict[str, list[Handler]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            self.bus.redis.xgroup_create(self.bus.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    def handler(self, *types: str) -> Callable[[Handler], Handler]:
        """Register a function for these event types (`"*"`: every type)."""

        def register(function: Handler) -> Handler:
            for event_type in types or ("*",):
                self.handlers.setdefault(str(event_type), []).append(function)
            return function

        return register

    def run_once(self, block_ms: int = 1000, count: int = 10) -> int:
        """Handle what a dead or failed consumer left, then new events; returns how many were handled."""
        handled = 0
        _, claimed, _ = self.bus.redis.xautoclaim(
            self.bus.stream,
            self.group,
            self.name,
            min_idle_time=self.claim_idle_ms,
            start_id="0-0",
            count=count,
        )
        for stream_id, fields in claimed:
            if fields is not None:
                handled += self._handle(as_text(stream_id), fields, redelivered=True)
        answer = self.bus.redis.xreadgroup(
            self.group, self.name, {self.bus.stream: ">"}, count=count, block=None if claimed else block_ms
        )
        for stream_id, fields in answer[0][1] if answer else []:
            handled += self._handle(as_text(stream_id), fields, redelivered=False)
        return handled

    def run(self, stop: threading.Event, block_ms: int = 1000) -> None:
        while not stop.is_set():
            self.run_once(block_ms=block_ms)

    def _handle(self, stream_id: str, fields: dict[Any, Any], redelivered: bool) -> int:
        raw = fields.get(b"event", fields.get("event", b""))
        if redelivered and self._deliveries(stream_id) > self.max_deliveries:
            return self._dead_letter(stream_id, raw, f"delivered more than {self.max_deliveries} times")
        try:
            event = parse_event(raw)
        except InvalidEventError as error:
            return self._dead_letter(stream_id, raw, str(error))
        handlers = self.handlers.get(event.type, []) + self.handlers.get("*", [])
        if not handlers:
            return self._dead_letter(stream_id, raw, f"no handler in group {self.group!r} for {event.type!r}")
        failed = False
        for function in handlers:
            try:
                function(event)
            except Exception:
                # The others still run; the entry stays pending and is retried after claim_idle_ms.
                failed = True
                logger.exception("handler %s failed on event %s", getattr(function, "__name__", function), stream_id)
        if failed:
            return 0
        self.bus.redis.xack(self.bus.stream, self.group, stream_id)
        return 1

    def _deliveries(self, stream_id: str) -> int:
        pending = self.bus.redis.xpending_range(self.bus.stream, self.group, min=stream_id, max=stream_id, count=1)
        return int(pending[0]["times_delivered"]) if pending else 0

    def _dead_letter(self, stream_id: str, raw: bytes | str, reason: str) -> int:
        # On a cluster the two streams are on two slots, where no transaction spans: a dead letter written
        # whose ack was lost is written again when the event is reclaimed (at least once, never lost).
        pipe = self.bus.redis.pipeline(transaction=not is_cluster(self.bus.redis))
        pipe.xadd(
            self.bus.dead_letter_stream,
            {"event": raw, "reason": reason, "group": self.group, "stream_id": stream_id},
            maxlen=self.bus.max_length,
            approximate=True,
        )
        pipe.xack(self.bus.stream, self.group, stream_id)
        pipe.execute()
        logger.warning("event %s moved to %s: %s", stream_id, self.bus.dead_letter_stream, reason)
        return 0
