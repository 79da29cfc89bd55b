"""What the processing graph asks for after a job, and what a backfill finds missing.

Planning is pure: it reads the graph and a snapshot of the dataset's cache entries, and returns a
:class:`Plan` (the jobs to enqueue, the errors to cache instead of running); :func:`run_plan` carries one
out. Nothing here knows a step's name or its content: a step with finer children declares where its
content lists them (`ProcessingStep.fan_out`).

After a success, a step's children are enqueued: one per config or split its content lists (fan-out), the
same key for a child of the same level, and a coarser child (fan-in) once every entry of its ancestors
that the dataset should have is in the cache and current (the ending's revision, its step's version).
After an error, the children of the same level, and finer ones the cache knows the keys of, get a cached
ParentStepFailedError that names the failing step, instead of running; coarser children are still
enqueued when ready, and report what is missing or failed.

A backfill enqueues only the topmost of what is to compute again: an entry below one that is stale,
missing or in process is left to that one's end, so that a changed dataset is computed once, each step
after its parents, on their new output.
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
    StepNotKnownError,
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
        "StepNotKnownError",  # no worker knew the step then: a backfill tries again once one does
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
    # a coarser child's job id, named by the entries it is ready on (`fan_in_id`): two endings that both find
    # it ready, on the same entries, enqueue one job; a job the ledger has already is not enqueued again
    fan_in_ids: dict[JobKey, str] = field(default_factory=dict)


EntryKey = tuple[str, str | None, str | None]  # kind, config, split: an entry of the dataset at hand
Present = set[EntryKey]


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


def _is_current(graph: ProcessingGraph, entry: cache.CachedResponse, revision: str | None) -> bool:
    """Whether the entry is of its step's job_runner_version and, when both are known, of this revision."""
    if entry.kind in graph and (entry.job_runner_version or 0) < graph.get_step(entry.kind).job_runner_version:
        return False
    return revision is None or entry.dataset_git_revision in (None, revision)


def _fan_in_inputs(
    graph: ProcessingGraph,
    child: ProcessingStep,
    dataset: str,
    config: str | None,
    entries: Sequence[cache.CachedResponse],
    present: Present,
    revision: str | None,
) -> list[cache.CachedResponse | EntryKey] | None:
    """The entries of the child's ancestors that the dataset should have (the key of one this plan caches an
    error for), when every one is in the cache, current (at the ending's revision, of its step's version);
    else None: while one is still to be computed again, the end that writes it enqueues the child, which then
    runs once, on its inputs' new output."""
    ancestors = {step.name for step in graph.ancestors(child.name)}
    expected = [
        key
        for key in expected_entries(graph, dataset, entries)
        if key.kind in ancestors and (config is None or key.config == config)
    ]
    by_key = {(entry.kind, entry.config, entry.split): entry for entry in entries}
    inputs: list[cache.CachedResponse | EntryKey] = []
    for key in expected:
        entry_key = (key.kind, key.config, key.split)
        entry = by_key.get(entry_key)
        if entry_key not in present or (entry is not None and not _is_current(graph, entry, revision)):
            return None
        inputs.append(entry if entry is not None else entry_key)
    return inputs or None


def fan_in_id(key: JobKey, inputs: Sequence[cache.CachedResponse | EntryKey]) -> str:
    """The job id of a coarser child ready on these inputs: each entry by its key, writer and time."""
    named = sorted(
        repr((i.kind, i.config, i.split, i.job_id, i.fence, i.updated_at.isoformat()))
        if isinstance(i, cache.CachedResponse)
        else repr(i)
        for i in inputs
    )
    return str(uuid.uuid5(CHILDREN, f"fan-in|{unicity_id(*key)}|{'|'.join(named)}"))


def _children(
    graph: ProcessingGraph,
    key: JobKey,
    content: Mapping[str, Any] | None,
    entries: Sequence[cache.CachedResponse],
    present: Present,
    revision: str | None,
    fan_in_ids: dict[JobKey, str],
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
            inputs = _fan_in_inputs(graph, child, key.dataset, config, entries, present, revision)
            if inputs is not None:
                jobs.append(JobKey(child.name, key.dataset, config, None))
                fan_in_ids[jobs[-1]] = fan_in_id(jobs[-1], inputs)
        # two levels finer, or no fan_out: the child's other parents enqueue it
    return jobs


def _revision_of(key: JobKey, entries: Iterable[cache.CachedResponse]) -> str | None:
    """The revision the job's own entry was computed at (None: unknown, or no entry)."""
    own = (entry for entry in entries if (entry.kind, entry.config, entry.split) == (key.step, key.config, key.split))
    return next((entry.dataset_git_revision for entry in own), None)


def plan_after_success(
    graph: ProcessingGraph, key: JobKey, content: Mapping[str, Any], entries: Sequence[cache.CachedResponse]
) -> Plan:
    """The jobs to enqueue now that this one succeeded (its entry is among `entries`)."""
    plan = Plan()
    plan.jobs = _children(graph, key, content, entries, _present(entries), _revision_of(key, entries), plan.fan_in_ids)
    return plan


def plan_after_failure(
    graph: ProcessingGraph, key: JobKey, error: CacheableError, entries: Sequence[cache.CachedResponse]
) -> Plan:
    """The errors to cache for the same-level and finer descendants (recursively), and the coarser jobs to
    enqueue. When a dataset-level step fails, what the dataset holds is unknown: every dataset-level
    descendant gets the error too."""
    plan, present, revision = Plan(), _present(entries), _revision_of(key, entries)

    def fail(key: JobKey, error: CacheableError) -> None:
        step = graph.get_step(key.step)
        children = _children(graph, key, None, entries, present, revision, plan.fan_in_ids)
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


class _EntrySet:
    """Cache keys, indexed to answer "is one of them an input, direct or not, of this entry?"."""

    def __init__(self, keys: Iterable[EntryKey]) -> None:
        self.keys: set[EntryKey] = set()
        self.kinds: set[str] = set()
        self.configs: set[tuple[str, str | None]] = set()
        for key in keys:
            self.add(key)

    def add(self, key: EntryKey) -> None:
        self.keys.add(key)
        self.kinds.add(key[0])
        self.configs.add(key[:2])

    def above(self, graph: ProcessingGraph, key: CacheKey) -> bool:
        """Whether one of the keys is of an ancestor step of the entry's, and of its config and split or
        coarser (a dataset-level entry takes in every config, a config-level one every split of it)."""
        for ancestor in graph.ancestors(key.kind):
            name = ancestor.name
            if key.config is None:
                found = name in self.kinds
            elif key.split is None:
                found = (name, key.config) in self.configs or (name, None, None) in self.keys
            else:
                coarser = {(name, None, None), (name, key.config, None), (name, key.config, key.split)}
                found = not self.keys.isdisjoint(coarser)
            if found:
                return True
        return False


def plan_backfill(
    graph: ProcessingGraph,
    dataset: str,
    entries: Sequence[cache.CachedResponse],
    revision: str | None,
    max_failed_runs: int,
    in_process: Iterable[EntryKey] = (),
) -> Plan:
    """The entries to compute again: missing (with their parents done), obsolete (older job_runner_version),
    stale (another revision), or a retryable error that failed fewer than `max_failed_runs` times; but only
    those not `in_process` (a job of theirs waits, runs, or ended and has its next steps still to enqueue)
    and none of whose ancestors is in process, to compute again or missing. Those descendants come after
    their parents' ends (`after_job`): each runs once, on its parents' new output, never on the old one."""
    by_key = {(entry.kind, entry.config, entry.split): entry for entry in entries}
    done_kinds = {kind for kind, _, _ in by_key}
    busy = set(in_process)
    changing = _EntrySet(busy)  # what will still change: its descendants wait for it
    due: list[CacheKey] = []
    for key in expected_entries(graph, dataset, entries):
        step = graph.get_step(key.kind)
        entry = by_key.get((key.kind, key.config, key.split))
        if entry is None:
            needed = all(parent in done_kinds for parent in step.parents)
        else:
            needed = not _is_current(graph, entry, revision) or (
                not entry.is_success and entry.error_code in RETRYABLE_ERRORS and entry.failed_runs < max_failed_runs
            )
        if entry is None or needed:
            changing.add((key.kind, key.config, key.split))
        if needed:
            due.append(key)
    topmost = [key for key in due if (key.kind, key.config, key.split) not in busy and not changing.above(graph, key)]
    return Plan(jobs=[JobKey(*key) for key in topmost])


# --- carrying plans out ------------------------------------------------------------------------------


def run_plan(plan: Plan, queue: Queue, priority: object = Priority.NORMAL, parent: Parent | None = None) -> list[Job]:
    """Cache the plan's errors, then enqueue its jobs; returns the jobs (a pending twin when there is one).
    A parent's plan gives its jobs the ids it derives, and one carried out again skips those that exist."""
    fence = parent.fence if parent is not None else None  # an effect of the parent's ending, stamped so
    for key, error in plan.errors:
        cache.upsert_error(key.step, key.dataset, error, config=key.config, split=key.split, fence=fence)
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
    since = datetime.fromtimestamp(parent.at_ms / 1000, UTC) if parent.again else None
    fan_ins = [item for item in valid if JobKey(*item) in plan.fan_in_ids]
    others = [item for item in valid if JobKey(*item) not in plan.fan_in_ids]
    jobs = queue.enqueue_many(
        others, priority=priority, job_ids=[parent.child_id(JobKey(*item)) for item in others], once_since=since
    )
    if fan_ins:  # ready on the same entries for another ending too: one job, once
        fan_in_ids = [plan.fan_in_ids[JobKey(*item)] for item in fan_ins]
        jobs += queue.enqueue_many(fan_ins, priority=priority, job_ids=fan_in_ids, once_since=since, once=True)
    return jobs


def after_job(
    queue: Queue,
    key: JobKey,
    content: Mapping[str, Any] | None,
    error: CacheableError | None,
    priority: object,
    parent: Parent | None = None,
) -> list[Job]:
    """Carry out what the graph asks for after this job (its children inherit its priority). A step this
    process's graph lacks (a user's step, applied by a worker that does not import its module) raises
    UnknownStepError: its children are planned by a process that knows it (the reaper's record waits for
    one), unless no worker knew the step (StepNotKnownError), hence none of its children."""
    if error is not None and error.error_code == StepNotKnownError.error_code:
        return []  # it never ran (no worker knew it): nothing follows until a backfill runs it
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
    if error is not None and plan.errors:
        # The errors just cached may complete a fan-in that another ending, which read the cache before they
        # landed, found incomplete (this plan read it before that ending's entry landed): read it again now,
        # so that of two such endings at least one enqueues it (a replay derives the same ids: none twice).
        again = plan_after_failure(graph, key, error, cache.get_dataset_responses(key.dataset))
        late = [child for child in dict.fromkeys(again.jobs) if child not in plan.jobs]
        jobs += run_plan(Plan(jobs=late, fan_in_ids=again.fan_in_ids), queue, priority, parent)
        plan.jobs += late
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


@dataclass(frozen=True)
class Producer:
    """Which job produces the entry of a key: its own job in process (waiting, queued, running, or ended with
    its next steps still to enqueue), else, while an ancestor's job is in process, none yet (`waiting_for`:
    that ancestor's, the oldest, the one the key waits for first), else the last job of the key that ran."""

    job: Job | None
    waiting_for: Job | None = None


def producer(queue: Queue, key: JobKey, in_process: Sequence[Job] | None = None) -> Producer:
    """The job that produces (or will produce, or last produced) the entry of `key`. A key's job is created
    only when its parents end (its id follows from their ending), so until then its ancestor is named."""
    busy = queue.in_process(key.dataset) if in_process is None else in_process
    own = [job for job in busy if JobKey(job.step, job.dataset, job.config, job.split) == key]
    if own:
        return Producer(own[-1])
    graph = get_processing_graph()
    ancestors = {step.name for step in graph.ancestors(key.step)} if key.step in graph else set()
    upstream = [
        job
        for job in busy
        if job.step in ancestors and job.config in (None, key.config) and job.split in (None, key.split)
    ]
    if upstream:
        return Producer(None, upstream[0])
    return Producer(queue.ledger.latest(unicity_id(*key)))


def backfill(queue: Queue, dataset: str, priority: object = Priority.LOW) -> list[Job]:
    """Enqueue what the graph expects of the dataset and the cache lacks: missing, obsolete (older
    job_runner_version), stale (another revision) or retryable errors, the topmost only (`plan_backfill`);
    returns the jobs enqueued. The CLI's, the API's and the webhook's backfills are this one."""
    from common.sources import get_source

    dataset, _, _ = validate_key(dataset, None, None)
    try:
        revision: str | None = get_source().revision(dataset)
    except StepcacheError:
        revision = None  # the root step will cache why
    # Read before the entries: a job that ends in between has its entry read, and its next steps in process.
    in_process = [(job.step, job.config, job.split) for job in queue.in_process(dataset)]
    entries = cache.get_dataset_responses(dataset)
    graph, max_failed_runs = get_processing_graph(), get_config().worker.max_failed_runs
    return run_plan(plan_backfill(graph, dataset, entries, revision, max_failed_runs, in_process), queue, priority)
