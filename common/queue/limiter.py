"""The per-namespace concurrency limiter, on Redis.

At most `limit` jobs of one namespace hold a lease at once (QUEUE_MAX_JOBS_PER_NAMESPACE, or the
namespace's override kept in Redis; 0 pauses it). A job is dispatched to Celery only once it holds a
lease, and executes only after `confirm` turned that lease into a started one; the rest wait in the
namespace's waiting room, ordered by priority then age, without occupying a worker or a broker slot.

Every decision is one Lua script (scripts/*.lua) over the namespace's keys, all passed in KEYS and
sharing one hash tag, so check-then-act never races and the keys live on one Redis Cluster slot.
Leases carry a fencing token: a redelivered or stale message, or a stale worker, holds no lease and
can neither run nor end someone else's attempt. Lease expiry uses Redis server time.

No decision lives only in memory: what a script dispatches, cancels or ends is recorded by that script
in the namespace's outbox (:class:`Record`), with a fence that only grows, and every ledger transition it
decides in the namespace's journal (written to MongoDB by common/queue/journal.py). The caller applies a
record's effects (publish, cache, events, next steps) and marks it `applied`; if it cannot (a lost
reply, an exception, a SIGKILL), the reaper's next pass gets the record back from `reap`. Dedupe is
Redis' too: the `pending` hash names the waiting or dispatched job of each unicity id.

Namespaces with work are listed in one set, so a reaper pass costs what the live namespaces cost; a
namespace with no job, no record and no journal entry keeps no key but its limit override.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from importlib.resources import files
from typing import Any

from common.constants import REDIS_PREFIX
from common.exceptions import InvalidInputError
from common.queue.jobs import Dispatch, Job, JobPayload, JobStatus, Priority
from common.redis_cluster import ScriptBatch, add_time, is_cluster, node_of
from common.redis_connection import RedisClient, as_text
from common.resilience import retry_transient

ACTIVE_KEY = f"{REDIS_PREFIX}:active"  # namespaces with jobs or records
LIMITS_KEY = f"{REDIS_PREFIX}:limits"  # namespaces with a limit override
REAP_BATCH = 100
RANK_WEIGHT = 10**15  # as in scripts/prelude.lua: a waiting job's score is rank * RANK_WEIGHT + age
FENCE_EPOCH_MS = 1_700_000_000_000  # as in scripts/prelude.lua: fences are microseconds since then
BORROWED = "borrowed"  # as in scripts/prelude.lua's `dispatch`
Wants = tuple[float, float]  # a borrower's slots held per unit of weight, and its weight (borrowing.py)
_KEY_NAMES = (
    "leases",
    "expiry",
    "waiting",
    "jobs",
    "attempts",
    "limit",
    "sequence",
    "owners",
    "blocked",
    "ages",
    "outbox",
    "runners",
    "pending",
    "journal",
    "policy",
)
_SCRIPTS = (
    "admit",
    "confirm",
    "renew",
    "end",
    "reap",
    "cancel",
    "set_limit",
    "promote",
    "resync",
    "restore_end",
    "unlease",
    "unstart",
    "applied",
    "journaled",
    "borrow",
)


# The scripts that may journal a ledger transition (their namespaces are noted for the journal's writer).
_JOURNALING = frozenset(
    {
        "admit",
        "confirm",
        "end",
        "reap",
        "cancel",
        "set_limit",
        "promote",
        "unlease",
        "unstart",
        "restore_end",
        "applied",
        "borrow",
    }
)


def namespace_key(namespace: str, name: str) -> str:
    """One of the namespace's keys; `{namespace}` is the hash tag all of them share."""
    return f"{REDIS_PREFIX}:{{{namespace}}}:{name}"


def namespace_keys(namespace: str) -> list[str]:
    """The namespace's keys, in the order every script takes them."""
    return [namespace_key(namespace, name) for name in _KEY_NAMES]


def _applied_args(records: Iterable[Record]) -> list[Any]:
    return [value for record in records for value in (record.payload.job_id, record.fence)]


def _load_script(name: str) -> str:
    scripts = files("common.queue") / "scripts"
    return (scripts / "prelude.lua").read_text() + "\n" + (scripts / f"{name}.lua").read_text()


class RecordKind(StrEnum):
    DISPATCH = "dispatch"  # publish the message, tell it
    REQUEUE = "requeue"  # (versions before the journal recorded these; nothing left to apply)
    CANCEL = "cancel"  # a job cancelled before it started: tell it
    END = "end"  # an attempt ended, or the reaper ended it: cache, events, next steps


class Ending(StrEnum):
    """How an attempt ended, as the outbox records it."""

    SUCCESS = "success"
    ERROR = "error"
    CANCELLED = "cancelled"
    CRASHED = "crashed"  # the reaper's: its worker died WORKER_MAX_ATTEMPTS times


@dataclass(frozen=True)
class Record:
    """A limiter decision whose effects outside Redis are to be applied (idempotently, fenced)."""

    kind: RecordKind
    fence: int
    token: str
    at_ms: int
    attempt: int
    ending: Ending | None
    error_code: str | None
    payload: JobPayload
    borrowed: bool = False  # a dispatch to a slot beyond the namespace's limit (common/queue/borrowing.py)

    @classmethod
    def parse(cls, raw: bytes | str, job_id: bytes | str) -> Record:
        kind, fence, token, at, attempt, status, code, payload = as_text(raw).split("|", 7)
        borrowed = status == BORROWED  # a dispatch's status field says whether its slot is borrowed
        return cls(
            RecordKind(kind),
            int(fence),
            token,
            int(at),
            int(attempt),
            Ending(status) if status and not borrowed else None,
            code or None,
            JobPayload.from_compact(as_text(job_id), payload),
            borrowed,
        )

    @property
    def dispatch(self) -> Dispatch:
        return Dispatch(self.payload, self.token, self.borrowed)


@dataclass(frozen=True)
class EndRecorded:
    """An end as something outside Redis recorded it (the ledger, a cache entry): how, its fence, its
    error code, and when (ms, 0: unknown)."""

    ending: Ending
    fence: int
    error_code: str | None = None
    at_ms: int = 0


class ConfirmDecision(StrEnum):
    RUN = "run"
    DROP = "drop"  # a redelivered, stale, cancelled or ended job's message


@dataclass(frozen=True)
class Confirmation:
    """What `confirm` decided for a message; a run is attempt number `attempt`, started at `fence`."""

    decision: ConfirmDecision
    attempt: int = 0
    fence: int = 0
    started: str = field(default="", compare=False)  # the start's journal entry ("" when repeated)

    @property
    def run(self) -> bool:
        return self.decision == ConfirmDecision.RUN


class LeaseState(StrEnum):
    RUNNING = "running"
    CANCELLED = "cancelled"  # still holds its slot until it ends
    LOST = "lost"  # reaped, or ended: this attempt is stale


@dataclass(frozen=True)
class Renewal:
    state: LeaseState
    fence: int = 0  # asked for: the fence of the outcome this attempt is about to write
    start: int = 0  # the start fence of the attempt holding the lease (0: unknown)


@dataclass(frozen=True)
class Reaped:
    records: list[Record]
    dispatched: list[Record]
    idle: bool
    requeued: list[str]
    crashed: list[str]
    journaled: int  # entries in its journal, not written to the ledger yet
    left_behind: bool  # the oldest of them is older than the grace: the process that made it is gone
    fence: int  # the pass's: the requeued jobs' attempts that started before it have smaller start fences
    wants: Wants | None = None  # it wants to borrow (common/queue/borrowing.py)


@dataclass(frozen=True)
class Cancellation:
    """What `cancel` did: the records of the jobs cancelled now, the started ones (they keep their slot
    until they end), the jobs dispatched to freed slots, and its fence (every attempt of these jobs that
    started before it has a smaller start fence)."""

    records: list[Record]
    started: list[str]
    dispatched: list[Record]
    fence: int


@dataclass(frozen=True)
class Admission:
    job_ids: list[str]  # each job's, or its pending twin's
    admitted: list[bool]  # False: known already (the job, or its twin)
    dispatched: list[Record]
    wanting: dict[str, Wants] = field(default_factory=dict)  # the namespaces that want to borrow


@dataclass(frozen=True)
class Ended:
    """What `end` did: the end record (None: the attempt was stale), the jobs dispatched to the freed slot,
    and whether the namespace wants to borrow (`Reaped.wants`)."""

    record: Record | None
    dispatched: list[Record] = field(default_factory=list)
    wants: Wants | None = None


@dataclass(frozen=True)
class Policy:
    """A namespace's borrowing overrides (None: the default): whether it may borrow idle capacity beyond
    its limit, the most slots it ever holds, and its weight among borrowers."""

    borrow: bool | None = None
    ceiling: int | None = None
    weight: float | None = None


def _policy(fields: Mapping[str, str]) -> Policy:
    return Policy(
        borrow=fields["borrow"] == "1" if "borrow" in fields else None,
        ceiling=int(fields["ceiling"]) if "ceiling" in fields else None,
        weight=float(fields["weight"]) if "weight" in fields else None,
    )


def _wants(reply: Any) -> Wants | None:
    """A script's `wants` (scripts/prelude.lua)."""
    text = as_text(reply)
    if not text:
        return None
    score, weight = text.split()
    return float(score), float(weight)


@dataclass(frozen=True)
class NamespaceCounts:
    waiting: int
    queued: int
    started: int

    @property
    def running(self) -> int:
        """Jobs holding a slot: dispatched to Celery or started."""
        return self.queued + self.started


@dataclass(frozen=True)
class NamespaceOverview:
    """One namespace as operators watch it (`python -m tasks top`, the live gauges)."""

    limit: int
    overridden: bool
    waiting: int
    queued: int
    started: int
    oldest_wait: float | None  # seconds its oldest waiting job has waited (Redis clock); None: none waits
    policy: Policy = field(default_factory=Policy)

    @property
    def counts(self) -> NamespaceCounts:
        return NamespaceCounts(self.waiting, self.queued, self.started)

    @property
    def borrowed(self) -> int:
        """Slots it holds beyond its limit."""
        return max(0, self.queued + self.started - self.limit)

    @property
    def weight(self) -> float:
        return self.policy.weight if self.policy.weight is not None else 1.0


class NamespaceLimiter:
    """The limiter's scripts, bound to one Redis client and the limits and lease TTLs in force."""

    def __init__(
        self,
        client: RedisClient,
        default_limit: int,
        started_ttl_seconds: float,
        queued_ttl_seconds: float,
        max_attempts: int,
        default_borrow: bool = False,
    ) -> None:
        self.redis = client
        self.default_limit = default_limit
        self.default_borrow = default_borrow
        self.started_ttl_ms = int(started_ttl_seconds * 1000)
        self.queued_ttl_ms = int(queued_ttl_seconds * 1000)
        self.max_attempts = max_attempts
        self.scripts = {name: client.register_script(_load_script(name)) for name in _SCRIPTS}
        # Told of the namespaces a script may have journaled in (the journal's writer sets it).
        self.on_journal: Callable[[Iterable[str]], None] = lambda namespaces: None

    # A script whose answer was lost is run again: every script is safe to repeat, and what the first
    # run decided is in the outbox (confirm and end answer a repeated call as they answered the first).
    @retry_transient
    def _run(self, script: str, namespace: str, *args: Any) -> Any:
        try:
            return self.scripts[script](keys=namespace_keys(namespace), args=list(args))
        finally:
            if script in _JOURNALING:
                self.on_journal([namespace])

    @retry_transient
    def _run_active(self, script: str, namespace: str, *args: Any) -> Any:
        """Run a script that may give the namespace work, listing the namespace as active before and
        after (the reaper unlists an idle namespace, then looks again: see `unlist_if_idle`)."""
        return self._run_listed([namespace], [(script, namespace, args)])[0]

    def _run_listed(self, namespaces: Sequence[str], calls: Sequence[tuple[str, str, Sequence[Any]]]) -> list[Any]:
        """Run scripts (name, namespace, args) that may give these namespaces work, listing them as active
        before and after; the scripts' replies. One round trip; two on a cluster, where the set and the
        namespaces are on different nodes, which run their commands in no order between them: there the
        second listing waits for the scripts' replies."""
        batch = ScriptBatch(self.redis)
        for namespace in namespaces:
            batch.pipe.sadd(ACTIVE_KEY, namespace)
        for script, namespace, args in calls:
            batch.script(self.scripts[script], namespace_keys(namespace), args)
        try:
            if is_cluster(self.redis):
                replies = batch.execute()[len(namespaces) :]
                self.redis.sadd(ACTIVE_KEY, *namespaces)
                return replies
            for namespace in namespaces:
                batch.pipe.sadd(ACTIVE_KEY, namespace)
            return batch.execute()[len(namespaces) : len(namespaces) + len(calls)]
        finally:
            self.on_journal(namespaces)

    def admit(self, payload: JobPayload, revision: str | None = None) -> tuple[bool, list[Record]]:
        """Park the job (behind its started twin, if it has one), then lease free slots of its
        namespace; False when the job, or an identical pending job, was already admitted."""
        admission = self.admit_many([payload], revision)
        return admission.job_ids == [payload.job_id] and admission.admitted[0], admission.dispatched

    @retry_transient
    def admit_many(self, payloads: Sequence[JobPayload], revision: str | None = None) -> Admission:
        """`admit` for many jobs in one pipelined round trip (each namespace listed as active before and
        after its jobs): each job's id (its pending twin's when it has one) and the dispatch records."""
        namespaces = list(dict.fromkeys(payload.namespace for payload in payloads))
        promote_args = self._promote_args()
        calls = [
            ("admit", p.namespace, [p.job_id, p.compact(), *promote_args, revision or "", self._borrow_arg])
            for p in payloads
        ]
        replies = self._run_listed(namespaces, calls)
        wanting = {}
        for payload, (*_, wants) in zip(payloads, replies, strict=True):
            if (score := _wants(wants)) is not None:
                wanting[payload.namespace] = score
        return Admission(
            [as_text(job_id) for _, _, job_id, _ in replies],
            [bool(admitted) for admitted, _, _, _ in replies],
            [record for _, dispatched, _, _ in replies for record in self._dispatched(dispatched)],
            wanting,
        )

    def confirm(self, namespace: str, job_id: str, token: str, delivery: str, worker: str = "") -> Confirmation:
        """At task start: run the job only if this message's token holds a lease not started yet, or
        this same delivery already confirmed it."""
        result = self._run("confirm", namespace, job_id, token, delivery, self.started_ttl_ms, worker)
        if as_text(result[0]) != ConfirmDecision.RUN:
            return Confirmation(ConfirmDecision.DROP)
        return Confirmation(ConfirmDecision.RUN, int(result[1]), int(as_text(result[2])), as_text(result[3]))

    def renew(self, namespace: str, job_id: str, token: str, fence: bool = False, start: int = 0) -> Renewal:
        """Extend a started attempt's lease (the attempt that started at fence `start`; 0: any attempt of
        the token); with `fence`, also hand out the fence of its outcome."""
        result = self._run("renew", namespace, job_id, token, self.started_ttl_ms, "1" if fence else "", start)
        state = LeaseState(as_text(result[0]))
        if state == LeaseState.LOST:
            return Renewal(state)
        return Renewal(state, int(as_text(result[1])) if fence else 0, int(as_text(result[2])))

    def end(
        self, payload: JobPayload, token: str, fence: int, ending: Ending, error_code: str | None, start: int = 0
    ) -> Ended:
        """End the attempt holding this token (the one that started at fence `start`; 0: any): see `Ended`."""
        result = self._run(
            "end",
            payload.namespace,
            payload.job_id,
            token,
            fence,
            ending.value,
            error_code or "",
            *self._promote_args(),
            start,
            self._borrow_arg,
        )
        if as_text(result[0]) != "ended":
            return Ended(None)
        return Ended(Record.parse(result[1], payload.job_id), self._dispatched(result[2]), _wants(result[3]))

    def reap(self, namespaces: Sequence[str], grace_ms: int) -> dict[str, Reaped]:
        """Take back expired leases of these namespaces (up to a batch each), lease free slots, and return
        the records their callers left behind for longer than `grace_ms`; one round trip for all (on a
        cluster, one per node, all at once)."""
        batch = ScriptBatch(self.redis)
        for namespace in namespaces:
            batch.script(
                self.scripts["reap"],
                namespace_keys(namespace),
                [self.max_attempts, *self._promote_args(), REAP_BATCH, grace_ms, self._borrow_arg],
            )
        reaped = {}
        for namespace, reply in zip(namespaces, batch.execute(), strict=True):
            records, dispatched, idle, requeued, crashed, journaled, left_behind, fence, wants = reply
            reaped[namespace] = Reaped(
                [Record.parse(records[i + 1], records[i]) for i in range(0, len(records), 2)],
                self._dispatched(dispatched),
                bool(idle),
                [as_text(job) for job in requeued],
                [as_text(job) for job in crashed],
                int(journaled),
                bool(left_behind),
                int(as_text(fence)),
                _wants(wants),
            )
        # What the scripts journaled (a requeue, a crash) is written by this process's writer.
        self.on_journal([namespace for namespace, reaped_one in reaped.items() if reaped_one.journaled])
        return reaped

    def cancel(self, namespace: str, job_ids: Sequence[str]) -> Cancellation:
        """Cancel these jobs (see `Cancellation`)."""
        records, started, dispatched, fence = self._run("cancel", namespace, *self._promote_args(), *job_ids)
        return Cancellation(
            [Record.parse(records[i + 1], records[i]) for i in range(0, len(records), 2)],
            [as_text(job) for job in started],
            self._dispatched(dispatched),
            int(as_text(fence)),
        )

    def unstart(self, namespace: str, job_id: str, token: str, start: int) -> bool:
        """Give back, unstarted, the job of an attempt whose start could not be made durable (unstart.lua)."""
        return bool(self._run("unstart", namespace, job_id, token, start))

    def promote(self, namespace: str) -> list[Record]:
        return self._dispatched(self._run("promote", namespace, *self._promote_args()))

    def unlease(self, namespace: str, job_id: str, token: str) -> int:
        """Give back the slot of a job whose message could not be published, and park it again; the fence
        of that decision, 0 when the job no longer held this dispatched lease."""
        return int(self._run("unlease", namespace, job_id, token))

    def applied(self, namespace: str, records: Iterable[Record]) -> bool:
        """Drop these records, their effects applied; True when the namespace has nothing left."""
        return bool(self._run("applied", namespace, *_applied_args(records)))

    def add_applied(self, batch: ScriptBatch, namespace: str, records: Iterable[Record]) -> None:
        """`applied`, in a batch the caller sends; its reply is the script's."""
        batch.script(self.scripts["applied"], namespace_keys(namespace), _applied_args(records))

    @retry_transient
    def journals(
        self, counts: dict[str, int], markers: Sequence[str] = ()
    ) -> tuple[dict[str, list[bytes]], dict[str, int], list[Any]]:
        """The first `count` journal entries of each namespace that has some, each journal's length, and
        the values of these marker keys, in one pipelined round trip (on a cluster, one per node, all at
        once)."""
        pipe = self.redis.pipeline(transaction=False)
        for marker in markers:
            pipe.get(marker)
        for namespace, count in counts.items():
            pipe.lrange(namespace_key(namespace, "journal"), 0, count - 1)
            pipe.llen(namespace_key(namespace, "journal"))
        replies = pipe.execute()
        values, replies = replies[: len(markers)], replies[len(markers) :]
        read, lengths = {}, {}
        for index, namespace in enumerate(counts):
            entries, lengths[namespace] = replies[2 * index], int(replies[2 * index + 1])
            if entries:
                read[namespace] = entries
        return read, lengths, values

    @retry_transient
    def journaled(self, read: dict[str, list[bytes]], markers: Sequence[str] = ()) -> tuple[list[str], list[Any]]:
        """Drop the entries read from each journal (see `journals`), now in MongoDB, unless another writer
        did; the namespaces left with nothing, and the values of these marker keys (one round trip)."""
        batch = ScriptBatch(self.redis)
        for namespace, entries in read.items():
            batch.script(self.scripts["journaled"], namespace_keys(namespace), [entries[0], len(entries)])
        for marker in markers:
            batch.pipe.get(marker)
        replies = batch.execute()
        idle = [namespace for namespace, reply in zip(read, replies, strict=False) if reply]
        return idle, replies[len(read) :]

    def resync(self, jobs: Sequence[tuple[Job, int]]) -> int:
        """Make Redis agree with the ledger about these jobs (each with its age), the newer side winning
        (see resync.lua); one pipelined round trip, each namespace listed as active before and after.
        How many took the ledger's state."""
        if not jobs:
            return 0
        calls = [
            (
                "resync",
                job.namespace,
                [
                    job.job_id,
                    job.payload().compact(),
                    job.status.value,
                    job.fence,
                    job.lease_token or "" if job.status == JobStatus.STARTED else "",
                    job.attempts,
                    self.started_ttl_ms,
                    age,
                ],
            )
            for job, age in jobs
        ]
        namespaces = list(dict.fromkeys(job.namespace for job, _ in jobs))
        return sum(int(reply) for reply in self._run_listed(namespaces, calls))

    def job_ids(self, namespace: str) -> list[str]:
        """The jobs Redis knows in this namespace (waiting, blocked or leased)."""
        return [as_text(job) for job in self.redis.hkeys(namespace_key(namespace, "jobs"))]

    def restore_end(
        self,
        payload: JobPayload,
        lease_token: str,
        attempts: int,
        end: EndRecorded,
    ) -> bool:
        """Record again the end of a job that Redis forgot (see restore_end.lua)."""
        args = [payload.job_id, payload.compact(), lease_token, attempts, end.fence, end.ending.value]
        return bool(self._run_active("restore_end", payload.namespace, *args, end.error_code or "", end.at_ms))

    def set_limit(self, namespace: str, limit: int | None) -> list[Record]:
        """Override the namespace's limit (0 pauses it), or clear the override with None."""
        if limit is not None and limit < 0:
            raise InvalidInputError(f"a namespace limit is 0 (paused) or more, not {limit}")
        if limit is None:
            if not self.redis.exists(namespace_key(namespace, "policy")):
                self.redis.srem(LIMITS_KEY, namespace)
        else:
            self.redis.sadd(LIMITS_KEY, namespace)
        dispatched = self._run("set_limit", namespace, *self._promote_args(), "" if limit is None else limit)
        return self._dispatched(dispatched)

    def get_limit(self, namespace: str) -> tuple[int, bool]:
        """The namespace's limit in force, and whether it is an override."""
        override = self.redis.get(namespace_key(namespace, "limit"))
        return (int(override), True) if override is not None else (self.default_limit, False)

    def overrides(self) -> dict[str, int]:
        """Every namespace whose limit is overridden, with its limit."""
        namespaces = sorted(as_text(ns) for ns in self.redis.smembers(LIMITS_KEY))
        return {namespace: self.get_limit(namespace)[0] for namespace in namespaces}

    def namespaces(self) -> list[str]:
        """The namespaces with work: jobs waiting, leased or blocked, or records to apply."""
        return sorted(as_text(ns) for ns in self.redis.smembers(ACTIVE_KEY))

    def unlist_if_idle(self, namespaces: Sequence[str]) -> None:
        """Unlist namespaces found idle; then look again, because a job may have come meanwhile
        (admitting lists the namespace after its script, so one of the two sees the other). Three round
        trips for all of them, one after the other: the looking must follow the unlisting, which on a
        cluster is on another node."""
        if not namespaces:
            return
        self.redis.srem(ACTIVE_KEY, *namespaces)
        pipe = self.redis.pipeline(transaction=False)
        for namespace in namespaces:
            pipe.exists(*(namespace_key(namespace, name) for name in ("jobs", "outbox", "journal")))
        busy = [namespace for namespace, found in zip(namespaces, pipe.execute(), strict=True) if found]
        if busy:
            self.redis.sadd(ACTIVE_KEY, *busy)

    def counts(self, namespace: str) -> NamespaceCounts:
        pipe = self.redis.pipeline(transaction=False)
        pipe.zcard(namespace_key(namespace, "waiting"))
        pipe.hvals(namespace_key(namespace, "leases"))
        waiting, leases = pipe.execute()
        queued = sum(1 for lease in leases if lease.startswith(b"q:"))
        return NamespaceCounts(int(waiting), queued, len(leases) - queued)

    def overview(self, namespaces: Iterable[str] | None = None) -> dict[str, NamespaceOverview]:
        """Limit, counts and oldest wait of these namespaces (by default every namespace with work or a
        limit override); read-only, in two round trips whatever their number (the names, then one pipeline
        of reads; on a cluster, one per node, all at once): a scrape's cost in round trips stays fixed. A
        waiting job's age is the fence of its admission (kept when requeued), so its wait is measured on
        the clock of the Redis that holds the namespace."""
        if namespaces is None:
            pipe = self.redis.pipeline(transaction=False)
            pipe.smembers(ACTIVE_KEY)
            pipe.smembers(LIMITS_KEY)
            active, overridden = pipe.execute()
            namespaces = (as_text(ns) for ns in (*active, *overridden))
        names = sorted(set(namespaces))
        if not names:
            return {}
        ranks = sorted({priority.rank for priority in Priority})
        per_namespace = 4 + len(ranks)
        # Per node (one on a single Redis), its clock, then its namespaces' keys.
        by_node: dict[str, list[str]] = {}
        for namespace in names:
            by_node.setdefault(node_of(self.redis, namespace_key(namespace, "waiting")), []).append(namespace)
        pipe = self.redis.pipeline(transaction=False)
        for batch in by_node.values():
            add_time(pipe, namespace_key(batch[0], "waiting"))
            for namespace in batch:
                self._read_overview(pipe, namespace, ranks)
        replies = pipe.execute()
        result = {}
        for batch in by_node.values():
            seconds, microseconds = replies[0]
            now = (int(seconds) * 1_000_000 + int(microseconds)) - FENCE_EPOCH_MS * 1000
            for i, namespace in enumerate(batch):
                reply = replies[1 + i * per_namespace : 1 + (i + 1) * per_namespace]
                result[namespace] = self._overview_of(reply, ranks, now)
            replies = replies[1 + len(batch) * per_namespace :]
        return result

    @staticmethod
    def _read_overview(pipe: Any, namespace: str, ranks: Sequence[int]) -> None:
        waiting = namespace_key(namespace, "waiting")
        pipe.get(namespace_key(namespace, "limit"))
        pipe.zcard(waiting)
        pipe.hvals(namespace_key(namespace, "leases"))
        pipe.hgetall(namespace_key(namespace, "policy"))
        for rank in ranks:  # the head of each priority: the oldest job of that priority
            low, high = rank * RANK_WEIGHT, (rank + 1) * RANK_WEIGHT
            pipe.zrangebyscore(waiting, low, f"({high}", start=0, num=1, withscores=True)

    def _overview_of(self, reply: Sequence[Any], ranks: Sequence[int], now: int) -> NamespaceOverview:
        override, waiting_count, leases, policy, *heads = reply
        ages = [int(head[0][1]) - rank * RANK_WEIGHT for rank, head in zip(ranks, heads, strict=True) if head]
        queued = sum(1 for lease in leases if as_text(lease).startswith("q:"))
        return NamespaceOverview(
            limit=self.default_limit if override is None else int(override),
            overridden=override is not None,
            waiting=int(waiting_count),
            queued=queued,
            started=len(leases) - queued,
            oldest_wait=max(0, now - min(ages)) / 1_000_000 if ages else None,
            policy=_policy({as_text(k): as_text(v) for k, v in policy.items()}),
        )

    def lease_token(self, namespace: str, job_id: str) -> str | None:
        """The token of the job's lease, if it holds one."""
        lease = self.redis.hget(namespace_key(namespace, "leases"), job_id)
        return None if lease is None else as_text(lease)[2:]

    def _promote_args(self) -> tuple[int, int]:
        return self.default_limit, self.queued_ttl_ms

    @property
    def _borrow_arg(self) -> str:
        return "1" if self.default_borrow else ""

    def borrow(
        self, slots: Mapping[str, int], idle: Mapping[str, int], pool_of_step: Mapping[str, str], default_pool: str
    ) -> dict[str, tuple[list[Record], Wants | None]]:
        """Lease up to `slots[namespace]` slots beyond each namespace's limit (borrow.lua) to its waiting
        jobs whose pool of workers has `idle` slots (`pool_of_step`, else `default_pool`); per namespace,
        the jobs dispatched (under its limit first, then borrowed) and whether it still wants to borrow.
        One round trip (on a cluster, one per node, all at once)."""
        batch = ScriptBatch(self.redis)
        budget, pools = json.dumps(dict(idle)), json.dumps(dict(pool_of_step))
        for namespace, count in slots.items():
            args = [*self._promote_args(), self._borrow_arg, count, budget, pools, default_pool]
            batch.script(self.scripts["borrow"], namespace_keys(namespace), args)
        try:
            replies = batch.execute()
        finally:
            self.on_journal(list(slots))
        return {
            namespace: ([*self._dispatched(promoted), *self._dispatched(borrowed, True)], _wants(wants))
            for namespace, (promoted, borrowed, wants) in zip(slots, replies, strict=True)
        }

    def policy(self, namespace: str) -> Policy:
        """The namespace's borrowing overrides."""
        fields = self.redis.hgetall(namespace_key(namespace, "policy"))
        return _policy({as_text(name): as_text(value) for name, value in fields.items()})

    def set_policy(self, namespace: str, policy: Policy) -> None:
        """Set the namespace's borrowing overrides (a None field: back to the default)."""
        if policy.ceiling is not None and policy.ceiling < 0:
            raise InvalidInputError(f"a namespace's ceiling is 0 or more slots, not {policy.ceiling}")
        if policy.weight is not None and not 0 < policy.weight <= 1000:
            raise InvalidInputError(f"a namespace's weight is more than 0 and at most 1000, not {policy.weight}")
        key = namespace_key(namespace, "policy")
        values = {"borrow": policy.borrow, "ceiling": policy.ceiling, "weight": policy.weight}
        pipe = self.redis.pipeline(transaction=True)
        for name, value in values.items():
            if value is None:
                pipe.hdel(key, name)
            else:
                pipe.hset(key, name, ("1" if value else "0") if isinstance(value, bool) else str(value))
        pipe.execute()
        if any(value is not None for value in values.values()):
            self.redis.sadd(LIMITS_KEY, namespace)
        elif self.redis.get(namespace_key(namespace, "limit")) is None:
            self.redis.srem(LIMITS_KEY, namespace)

    @staticmethod
    def _dispatched(flat: Iterable[Any], borrowed: bool = False) -> list[Record]:
        """The dispatch records of a script's `promote` (or its borrowed dispatches), as the outbox holds
        them."""
        items = list(flat)
        return [
            Record(
                RecordKind.DISPATCH,
                int(as_text(items[i + 1])),
                as_text(items[i + 1]),
                0,
                0,
                None,
                None,
                JobPayload.from_compact(as_text(items[i]), items[i + 2]),
                borrowed,
            )
            for i in range(0, len(items), 3)
        ]
