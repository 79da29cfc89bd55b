"""What the processing graph asks for after a job, and what a backfill finds missing.

Planning is pure: it reads the graph and a snapshot of the dataset's cache entries, and returns a
:class:`Plan` (the jobs to enqueue, the errors to cache instead of running); :func:`run_plan` carries one
out. Nothing here knows a step's name or its content: a step with finer children declares where its
content lists them (`ProcessingStep.fan_out`).

After a success, a step's children are enqueued: one per config or split its content lists (fan-out), the
same key for a child of the same level, and a coarser child (fan-in) once every entry of its ancestors
that the dataset should have is in the cache. After an error, the children of the same level, and finer
ones the cache knows the keys of, get a cached ParentStepFailedError that names the failing step, instead
of running; coarser children are still enqueued when ready, and report what is missing or failed.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from common import cache
from common.config import get_config
from common.exceptions import (
    CacheableError,
    CachedResponseNotFoundError,
    InvalidInputError,
    InvalidStepSpecError,
    ParentStepFailedError,
    StepcacheError,
)
from common.names import namespace_of, validate_key
from common.processing_graph import (
    LEVEL,
    CacheKey,
    InputType,
    Listing,
    ProcessingGraph,
    ProcessingStep,
    get_processing_graph,
)
from common.queue import Job, Priority, Queue
from common.queue.jobs import unicity_id
from common.queue.queue import JobInput, new_job

logger = logging.getLogger(__name__)
CHILDREN = uuid.UUID("4f0c3a52-5d3e-4d8e-9b7c-2d1c6a7e9f10")  # the uuid5 namespace of children's job ids
RETRYABLE_ERRORS = frozenset(
    {
        "JobManagerCrashedError",
        "JobManagerExceededMaximumDurationError",
        "HubUnavailableError",
        "HubTransientError",
        "UnexpectedError",
        "PreviousStepMissingError",
    }
)


class JobKey(NamedTuple):
    step: str
    dataset: str
    config: str | None
    split: str | None


class Parent(NamedTuple):
    """The ending whose plan is carried out: its job and fence name its children's job ids, so that carrying
    it out again enqueues none twice (`again`: it may have been carried out before; the ending's time
    `at_ms`, the Redis clock's, tells the twins that computed a child since)."""

    job_id: str
    fence: int
    again: bool = False
    at_ms: int = 0

    def child_id(self, key: JobKey) -> str:
        return str(uuid.uuid5(CHILDREN, f"{self.job_id}|{self.fence}|{unicity_id(*key)}"))


@dataclass
class Plan:
    """Jobs to enqueue, and errors to cache for entries that will not be computed (their parent failed)."""

    jobs: list[JobKey] = field(default_factory=list)
    errors: list[tuple[JobKey, CacheableError]] = field(default_factory=list)


Present = set[tuple[str, str | None, str | None]]


def _present(entries: Iterable[cache.CachedResponse]) -> Present:
    return {(entry.kind, entry.config, entry.split) for entry in entries}


def _listed(step: ProcessingStep, content: Mapping[str, Any]) -> list[str]:
    try:
        return step.names_in(content)
    except InvalidStepSpecError as error:  # the step's own run checked it; an older entry may not list
        logger.warning("%s", error)
        return []


def listing(entries: Iterable[cache.CachedResponse]) -> Listing:
    """What each fanning-out step's successful entry lists (a step without one lists nothing)."""
    successes = {(entry.kind, entry.config): entry for entry in entries if entry.is_success}

    def listed(source: ProcessingStep, config: str | None) -> list[str]:
        entry = successes.get((source.name, config))
        return _listed(source, entry.content) if entry is not None else []

    return listed


def expected_entries(graph: ProcessingGraph, dataset: str, entries: Iterable[cache.CachedResponse]) -> list[CacheKey]:
    """The cache keys the graph expects of the dataset, given what its entries list."""
    return graph.expected_entries(dataset, listing(entries))


def _fan_in_ready(
    graph: ProcessingGraph,
    child: ProcessingStep,
    dataset: str,
    config: str | None,
    entries: Sequence[cache.CachedResponse],
    present: Present,
) -> bool:
    """Whether every entry of the child's ancestors that the dataset should have is in the cache."""
    ancestors = {step.name for step in graph.ancestors(child.name)}
    expected = [
        key
        for key in expected_entries(graph, dataset, entries)
        if key.kind in ancestors and (config is None or key.config == config)
    ]
    return bool(expected) and all((key.kind, key.config, key.split) in present for key in expected)


def _children(
    graph: ProcessingGraph,
    key: JobKey,
    content: Mapping[str, Any] | None,
    entries: Sequence[cache.CachedResponse],
    present: Present,
) -> list[JobKey]:
    parent = graph.get_step(key.step)
    jobs = []
    for child in graph.children(key.step):
        finer = LEVEL[child.input_type] - LEVEL[parent.input_type]
        if finer == 0:
            jobs.append(JobKey(child.name, key.dataset, key.config, key.split))
        elif finer == 1 and parent.fan_out is not None:
            if content is not None:
                names = _listed(parent, content)
            else:  # a failed parent lists nothing: its earlier entry's list, and the child's entries there are
                existing = [
                    entry.config if child.input_type is InputType.CONFIG else entry.split
                    for entry in entries
                    if entry.kind == child.name and (child.input_type is InputType.CONFIG or entry.config == key.config)
                ]
                names = list(dict.fromkeys([*listing(entries)(parent, key.config), *filter(None, existing)]))
            if parent.input_type is InputType.DATASET:
                jobs += [JobKey(child.name, key.dataset, name, None) for name in names]
            else:
                jobs += [JobKey(child.name, key.dataset, key.config, name) for name in names]
        elif finer < 0:
            config = key.config if child.input_type is InputType.CONFIG else None
            if _fan_in_ready(graph, child, key.dataset, config, entries, present):
                jobs.append(JobKey(child.name, key.dataset, config, None))
        # two levels finer, or no fan_out: the child's other parents enqueue it
    return jobs


def plan_after_success(
    graph: ProcessingGraph, key: JobKey, content: Mapping[str, Any], entries: Sequence[cache.CachedResponse]
) -> Plan:
    """The jobs to enqueue now that this one succeeded (its entry is among `entries`)."""
    return Plan(jobs=_children(graph, key, content, entries, _present(entries)))


def plan_after_failure(
    graph: ProcessingGraph, key: JobKey, error: CacheableError, entries: Sequence[cache.CachedResponse]
) -> Plan:
    """The errors to cache for the same-level and finer descendants (recursively), and the coarser jobs to
    enqueue. When a dataset-level step fails, what the dataset holds is unknown: every dataset-level
    descendant gets the error too."""
    plan, present = Plan(), _present(entries)

    def fail(key: JobKey, error: CacheableError) -> None:
        step = graph.get_step(key.step)
        children = _children(graph, key, None, entries, present)
        if step.input_type is InputType.DATASET:
            listed = {child.step for child in children}
            children = [
                JobKey(descendant.name, key.dataset, None, None)
                for descendant in graph.descendants(key.step)
                if descendant.input_type is InputType.DATASET and descendant.name not in listed
            ] + children
        for child in children:
            if LEVEL[graph.get_step(child.step).input_type] < LEVEL[step.input_type]:
                plan.jobs.append(child)  # a fan-in step runs anyway and reports what failed
                continue
            failure = ParentStepFailedError(f"not computed: {key.step!r} failed with {error.error_code}", cause=error)
            failure.http_status = error.http_status
            plan.errors.append((child, failure))
            present.add((child.step, child.config, child.split))
            fail(child, failure)

    fail(key, error)
    return plan


def plan_backfill(
    graph: ProcessingGraph,
    dataset: str,
    entries: Sequence[cache.CachedResponse],
    revision: str | None,
    max_failed_runs: int,
) -> Plan:
    """The entries to compute again: missing (with their parents done), obsolete (older job_runner_version),
    stale (another revision), or a retryable error that failed fewer than `max_failed_runs` times."""
    by_key = {(entry.kind, entry.config, entry.split): entry for entry in entries}
    done_kinds = {kind for kind, _, _ in by_key}
    plan = Plan()
    for key in expected_entries(graph, dataset, entries):
        step = graph.get_step(key.kind)
        entry = by_key.get((key.kind, key.config, key.split))
        if entry is None:
            needed = all(parent in done_kinds for parent in step.parents)
        else:
            needed = (
                (entry.job_runner_version or 0) < step.job_runner_version
                or (revision is not None and entry.dataset_git_revision not in (None, revision))
                or (
                    not entry.is_success
                    and entry.error_code in RETRYABLE_ERRORS
                    and entry.failed_runs < max_failed_runs
                )
            )
        if needed:
            plan.jobs.append(JobKey(key.kind, key.dataset, key.config, key.split))
    return plan


# --- carrying plans out ------------------------------------------------------------------------------


def run_plan(plan: Plan, queue: Queue, priority: object = Priority.NORMAL, parent: Parent | None = None) -> list[Job]:
    """Cache the plan's errors, then enqueue its jobs; returns the jobs (a pending twin when there is one).
    A parent's plan gives its jobs the ids it derives, and one carried out again skips those that exist."""
    for key, error in plan.errors:
        cache.upsert_error(key.step, key.dataset, error, config=key.config, split=key.split)
    valid: list[JobInput] = []
    for key in plan.jobs:
        try:
            new_job(JobInput(*key), Priority.NORMAL, None)  # what enqueue_many would refuse
            valid.append(JobInput(*key))
        except InvalidInputError as error:
            # A name an older entry listed that is not valid (a step's new content is checked when it runs):
            # the others go on, and retrying would not make it valid.
            logger.warning("not enqueued: %s %s %s %s: %s", *key, error)
    if parent is None:
        return queue.enqueue_many(valid, priority=priority)
    job_ids = [parent.child_id(JobKey(*item)) for item in valid]
    since = datetime.fromtimestamp(parent.at_ms / 1000, UTC) if parent.again else None
    return queue.enqueue_many(valid, priority=priority, job_ids=job_ids, once_since=since)


def after_job(
    queue: Queue,
    key: JobKey,
    content: Mapping[str, Any] | None,
    error: CacheableError | None,
    priority: object,
    parent: Parent | None = None,
) -> list[Job]:
    """Carry out what the graph asks for after this job (its children inherit its priority)."""
    graph = get_processing_graph()
    if not graph.children(key.step):
        return []  # nothing to plan: no need to read the dataset's entries
    entries = cache.get_dataset_responses(key.dataset)
    if not any(_is_own(entry, key, parent) for entry in entries):
        # The job's own entry is gone: the dataset was deleted or moved meanwhile (or a newer job of the
        # key replaced it, and plans what follows). Nothing follows it.
        logger.info("nothing enqueued after %s %s %s %s: its cache entry is gone", *key)
        return []
    if error is None:
        plan = plan_after_success(graph, key, content or {}, entries)
    else:
        plan = plan_after_failure(graph, key, error, entries)
    jobs = run_plan(plan, queue, priority, parent)
    if parent is not None and not _has_own_entry(key, parent):
        # Deleted while the plan ran (a delete removes the entries, then cancels the jobs): the children it
        # enqueued are cancelled (only those: not the jobs of a dataset created again meanwhile) and what it
        # cached removed, as the delete would have.
        logger.info("%s %s %s %s: its entry went while its next steps were enqueued; cancelled", *key)
        ours = {parent.child_id(child) for child in plan.jobs}
        queue.cancel_jobs(namespace_of(key.dataset), [job.job_id for job in jobs if job.job_id in ours])
        for child, _ in plan.errors:
            cache.delete_response(child.step, child.dataset, child.config, child.split)
        return []
    return jobs


def _is_own(entry: cache.CachedResponse, key: JobKey, parent: Parent | None) -> bool:
    """The entry of the job's key, written by the job whose ending this is (or by a version that did not
    say which job wrote it)."""
    if (entry.kind, entry.config, entry.split) != (key.step, key.config, key.split):
        return False
    return parent is None or entry.job_id in (None, parent.job_id)


def _has_own_entry(key: JobKey, parent: Parent) -> bool:
    try:
        return _is_own(cache.get_response(key.step, key.dataset, key.config, key.split), key, parent)
    except CachedResponseNotFoundError:
        return False


def backfill(queue: Queue, dataset: str, priority: object = Priority.LOW) -> list[Job]:
    """Enqueue what the graph expects of the dataset and the cache lacks: missing, obsolete (older
    job_runner_version), stale (another revision) or retryable errors; returns the jobs enqueued."""
    from common.sources import get_source

    dataset, _, _ = validate_key(dataset, None, None)
    try:
        revision: str | None = get_source().revision(dataset)
    except StepcacheError:
        revision = None  # the root step will cache why
    entries = cache.get_dataset_responses(dataset)
    plan = plan_backfill(get_processing_graph(), dataset, entries, revision, get_config().worker.max_failed_runs)
    return run_plan(plan, queue, priority)
