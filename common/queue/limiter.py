"""The per-namespace concurrency limiter, on Redis.

At most `limit` jobs of one namespace hold a lease at once (QUEUE_MAX_JOBS_PER_NAMESPACE, or the
namespace's override kept in Redis; 0 pauses it). A job is dispatched to Celery only once it holds a
lease, and executes only after `confirm` turned that lease into a started one; the rest wait in the
namespace's waiting room, ordered by priority then age, without occupying a worker or a broker slot.

Every decision is one Lua script (scripts/*.lua) over the namespace's keys, all passed in KEYS and
sharing one hash tag, so check-then-act never races and the keys live on one Redis Cluster slot.
Leases carry a fencing token: a redelivered or stale message, or a stale worker, holds no lease and
can neither run nor release someone else's slot. Lease expiry uses Redis server time, never a
worker's clock. The limiter only decides: its caller publishes what it dispatches.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import redis

from common.constants import REDIS_PREFIX
from common.queue.jobs import Dispatch, JobPayload
from common.resilience import retry_transient

NAMESPACES_KEY = f"{REDIS_PREFIX}:namespaces"
REAP_BATCH = 100
_KEY_NAMES = ("leases", "expiry", "waiting", "jobs", "attempts", "limit", "sequence", "owners", "blocked")


def namespace_key(namespace: str, name: str) -> str:
    """One of the namespace's keys; `{namespace}` is the hash tag all of them share."""
    return f"{REDIS_PREFIX}:{{{namespace}}}:{name}"


def namespace_keys(namespace: str) -> list[str]:
    """The namespace's keys, in the order every script takes them."""
    return [namespace_key(namespace, name) for name in _KEY_NAMES]


def _load_script(name: str) -> str:
    scripts = files("common.queue") / "scripts"
    return (scripts / "prelude.lua").read_text() + "\n" + (scripts / f"{name}.lua").read_text()


@dataclass(frozen=True)
class Confirmation:
    """What `confirm` decided for a message: run it (as this attempt), drop it, or ask the ledger."""

    decision: str
    attempt: int = 0

    @property
    def run(self) -> bool:
        return self.decision == "run"


@dataclass(frozen=True)
class Reaped:
    crashed: list[JobPayload]
    requeued: list[tuple[str, str]]  # job id, and the token of the lease that expired
    dispatched: list[Dispatch]


@dataclass(frozen=True)
class NamespaceCounts:
    waiting: int
    queued: int
    started: int

    @property
    def running(self) -> int:
        """Jobs holding a slot: dispatched to Celery or started."""
        return self.queued + self.started


class NamespaceLimiter:
    """The limiter's scripts, bound to one Redis client and the limits and lease TTLs in force."""

    def __init__(
        self,
        client: redis.Redis,
        default_limit: int,
        started_ttl_seconds: float,
        queued_ttl_seconds: float,
        max_attempts: int,
    ) -> None:
        self.redis = client
        self.default_limit = default_limit
        self.started_ttl_ms = int(started_ttl_seconds * 1000)
        self.queued_ttl_ms = int(queued_ttl_seconds * 1000)
        self.max_attempts = max_attempts
        self.scripts = {
            name: client.register_script(_load_script(name))
            for name in (
                "admit",
                "confirm",
                "renew",
                "release_and_promote",
                "reap",
                "cancel",
                "set_limit",
                "promote",
                "restore",
                "unlease",
            )
        }

    # A script whose answer was lost is run again: every script is safe to repeat (admit and restore are
    # idempotent; a repeated confirm drops the message and the reaper later requeues its job).
    @retry_transient
    def _run(self, script: str, namespace: str, *args: Any) -> Any:
        return self.scripts[script](keys=namespace_keys(namespace), args=list(args))

    @retry_transient
    def admit(self, payload: JobPayload) -> tuple[bool, list[Dispatch]]:
        """Park the job (behind its started twin, if it has one), then lease free slots of its
        namespace; False when the job was already admitted."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.sadd(NAMESPACES_KEY, payload.namespace)
        self.scripts["admit"](
            keys=namespace_keys(payload.namespace),
            args=[payload.job_id, payload.model_dump_json(), self.default_limit, self.queued_ttl_ms],
            client=pipe,
        )
        _, (admitted, dispatched) = pipe.execute()
        return bool(admitted), _dispatches(dispatched)

    def confirm(self, namespace: str, job_id: str, token: str) -> Confirmation:
        """At task start: run the job only if this message's token holds a lease not started yet."""
        result = self._run("confirm", namespace, job_id, token, self.started_ttl_ms)
        decision = _text(result[0])
        return Confirmation(decision, int(result[1]) if len(result) > 1 else 0)

    def renew(self, namespace: str, job_id: str, token: str) -> int:
        """Extend a started job's lease: 1 renewed, 2 renewed for a job cancelled while it runs, 0 lost."""
        return int(self._run("renew", namespace, job_id, token, self.started_ttl_ms))

    def unlease(self, namespace: str, job_id: str, token: str) -> bool:
        """Give back the slot of a job whose message could not be published, and park it again."""
        return bool(self._run("unlease", namespace, job_id, token))

    def release_and_promote(self, namespace: str, job_id: str, token: str) -> tuple[bool, list[Dispatch]]:
        """Free the job's slot if its token still holds it, and lease free slots to waiting jobs."""
        released, dispatched = self._run(
            "release_and_promote", namespace, job_id, token, self.default_limit, self.queued_ttl_ms
        )
        return bool(released), _dispatches(dispatched)

    def reap(self, namespace: str) -> Reaped:
        """Take back the namespace's expired leases (up to a batch), requeue or fail their jobs, promote."""
        crashed, requeued, dispatched = self._run(
            "reap", namespace, self.max_attempts, self.default_limit, self.queued_ttl_ms, REAP_BATCH
        )
        payloads = [JobPayload.model_validate_json(crashed[i + 1]) for i in range(0, len(crashed), 2)]
        pairs = [(_text(requeued[i]), _text(requeued[i + 1])) for i in range(0, len(requeued), 2)]
        return Reaped(payloads, pairs, _dispatches(dispatched))

    def cancel(self, namespace: str, job_ids: Sequence[str]) -> tuple[list[str], list[Dispatch]]:
        """Forget these jobs (waiting or leased), and lease the freed slots to waiting jobs."""
        cancelled, dispatched = self._run("cancel", namespace, self.default_limit, self.queued_ttl_ms, *job_ids)
        return [_text(job) for job in cancelled], _dispatches(dispatched)

    def promote(self, namespace: str) -> list[Dispatch]:
        return _dispatches(self._run("promote", namespace, self.default_limit, self.queued_ttl_ms))

    def restore(self, payload: JobPayload, lease_token: str | None, attempts: int) -> bool:
        """Rebuild one job from the ledger unless Redis knows it: a started job gets its lease back."""
        self.redis.sadd(NAMESPACES_KEY, payload.namespace)
        return bool(
            self._run(
                "restore",
                payload.namespace,
                payload.job_id,
                payload.model_dump_json(),
                lease_token or "",
                attempts,
                self.started_ttl_ms,
            )
        )

    def set_limit(self, namespace: str, limit: int | None) -> list[Dispatch]:
        """Override the namespace's limit (0 pauses it), or clear the override with None."""
        if limit is not None and limit < 0:
            raise ValueError("a namespace limit is 0 (paused) or more")
        self.redis.sadd(NAMESPACES_KEY, namespace)
        return _dispatches(
            self._run("set_limit", namespace, self.default_limit, self.queued_ttl_ms, "" if limit is None else limit)
        )

    def get_limit(self, namespace: str) -> tuple[int, bool]:
        """The namespace's limit in force, and whether it is an override."""
        override = self.redis.get(namespace_key(namespace, "limit"))
        return (int(override), True) if override is not None else (self.default_limit, False)

    def overrides(self) -> dict[str, int]:
        """Every namespace whose limit is overridden, with its limit."""
        result = {}
        for namespace in self.namespaces():
            limit, overridden = self.get_limit(namespace)
            if overridden:
                result[namespace] = limit
        return result

    def namespaces(self) -> list[str]:
        return sorted(_text(ns) for ns in self.redis.smembers(NAMESPACES_KEY))

    def counts(self, namespace: str) -> NamespaceCounts:
        pipe = self.redis.pipeline(transaction=False)
        pipe.zcard(namespace_key(namespace, "waiting"))
        pipe.hvals(namespace_key(namespace, "leases"))
        waiting, leases = pipe.execute()
        queued = sum(1 for lease in leases if lease.startswith(b"q:"))
        return NamespaceCounts(int(waiting), queued, len(leases) - queued)

    def lease_token(self, namespace: str, job_id: str) -> str | None:
        """The token of the job's lease, if it holds one."""
        lease = self.redis.hget(namespace_key(namespace, "leases"), job_id)
        return None if lease is None else _text(lease)[2:]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _dispatches(flat: Iterable[Any]) -> list[Dispatch]:
    items = list(flat)
    return [
        Dispatch(JobPayload.model_validate_json(items[i + 2]), _text(items[i + 1])) for i in range(0, len(items), 3)
    ]
