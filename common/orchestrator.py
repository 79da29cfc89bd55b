"""What the processing graph asks for after a job, and what a backfill finds missing.

After a success, a step's children are enqueued: one per config or split its content lists (fan-out), the
same key for a child of the same level, and a coarser child (fan-in, e.g. dataset-size) once every entry
of its ancestors that the dataset should have is in the cache. After an error, the children of the same
level, and finer ones the cache knows the keys of, get a cached ParentStepFailedError that names the
failing step, instead of running; coarser children are still enqueued when ready, and report what is
missing or failed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from common import cache
from common.config import get_config
from common.exceptions import CacheableError, ParentStepFailedError
from common.processing_graph import CacheKey, InputType, ProcessingStep, get_processing_graph

LEVEL = {InputType.DATASET: 0, InputType.CONFIG: 1, InputType.SPLIT: 2}
RETRYABLE_ERRORS = frozenset(
    {
        "JobManagerCrashedError",
        "JobManagerExceededMaximumDurationError",
        "HubUnavailableError",
        "UnexpectedError",
        "PreviousStepMissingError",
    }
)


class JobKey(NamedTuple):
    step: str
    dataset: str
    config: str | None
    split: str | None


def _configs_in(content: Mapping[str, Any]) -> list[str]:
    return [item["config"] for item in content.get("config_names", [])]


def _splits_in(content: Mapping[str, Any]) -> list[str]:
    listed = content.get("splits") or content.get("parquet_files") or []
    return list(dict.fromkeys(item["split"] for item in listed))


def known_configs(entries: Iterable[cache.CachedResponse]) -> dict[str, list[str]]:
    """The configs and splits the cache knows of: from dataset-config-names and config-split-names."""
    entries = list(entries)
    configs: dict[str, list[str]] = {}
    for entry in entries:
        if entry.kind == "dataset-config-names" and entry.is_success:
            configs = {config: [] for config in _configs_in(entry.content)}
    for entry in entries:
        if entry.kind == "config-split-names" and entry.is_success and entry.config in configs:
            configs[entry.config] = _splits_in(entry.content)
    return configs


def _fan_in_ready(child: ProcessingStep, dataset: str, config: str | None) -> bool:
    """Whether every entry of the child's ancestors that the dataset should have is in the cache."""
    graph = get_processing_graph()
    entries = cache.get_dataset_responses(dataset)
    present = {(e.kind, e.config, e.split) for e in entries}
    ancestors = {step.name for step in graph.ancestors(child.name)}
    expected = [
        key
        for key in graph.expected_entries(dataset, known_configs(entries))
        if key.kind in ancestors and (config is None or key.config == config)
    ]
    return bool(expected) and all((key.kind, key.config, key.split) in present for key in expected)


def _children(step: str, key: JobKey, content: Mapping[str, Any] | None) -> list[JobKey]:
    graph = get_processing_graph()
    parent = graph.get_step(step)
    jobs = []
    for child in graph.children(step):
        if LEVEL[child.input_type] == LEVEL[parent.input_type]:
            jobs.append(JobKey(child.name, key.dataset, key.config, key.split))
        elif LEVEL[child.input_type] > LEVEL[parent.input_type]:
            # A failed parent lists nothing: fan out to what the cache knows of the dataset instead.
            known = known_configs(cache.get_dataset_responses(key.dataset)) if content is None else None
            if parent.input_type == InputType.DATASET and child.input_type == InputType.CONFIG:
                configs = list(known) if known is not None else _configs_in(content or {})
                jobs += [JobKey(child.name, key.dataset, config, None) for config in configs]
            elif parent.input_type == InputType.CONFIG and child.input_type == InputType.SPLIT:
                splits = known.get(key.config or "", []) if known is not None else _splits_in(content or {})
                jobs += [JobKey(child.name, key.dataset, key.config, split) for split in splits]
        else:
            config = key.config if child.input_type == InputType.CONFIG else None
            if _fan_in_ready(child, key.dataset, config):
                jobs.append(JobKey(child.name, key.dataset, config, None))
    return jobs


def after_success(step: str, key: JobKey, content: Mapping[str, Any]) -> list[JobKey]:
    """The jobs to enqueue now that this one succeeded."""
    return _children(step, key, content)


def after_failure(step: str, key: JobKey, error: CacheableError) -> list[JobKey]:
    """Cache an error for the same-level descendants (recursively), and return the jobs to enqueue.

    When a dataset-level step fails, what the dataset holds is unknown: every dataset-level descendant
    (e.g. dataset-size, dataset-is-valid) gets the error too."""
    graph = get_processing_graph()
    to_enqueue = []
    children = _children(step, key, None)
    if graph.get_step(step).input_type == InputType.DATASET:
        children = [
            JobKey(d.name, key.dataset, None, None)
            for d in graph.descendants(step)
            if d.input_type == InputType.DATASET and d.name not in {c.step for c in children}
        ] + children
    for child in children:
        coarser = LEVEL[graph.get_step(child.step).input_type] < LEVEL[graph.get_step(step).input_type]
        if coarser:
            to_enqueue.append(child)  # a fan-in step runs anyway and reports what failed
            continue
        failure = ParentStepFailedError(f"not computed: {step!r} failed with {error.error_code}", cause=error)
        failure.http_status = error.http_status
        cache.upsert_error(
            child.step,
            child.dataset,
            failure,
            config=child.config,
            split=child.split,
        )
        to_enqueue += after_failure(child.step, child, failure)
    return to_enqueue


def backfill_plan(dataset: str, revision: str | None) -> list[JobKey]:
    """The entries to compute again: missing (with their parents done), obsolete (older job_runner_version),
    stale (another revision), or a retryable error that failed fewer than WORKER_MAX_FAILED_RUNS times."""
    graph = get_processing_graph()
    entries = {(e.kind, e.config, e.split): e for e in cache.get_dataset_responses(dataset)}
    expected: list[CacheKey] = graph.expected_entries(dataset, known_configs(entries.values()))
    done_kinds = {kind for kind, _, _ in entries}
    max_failed_runs = get_config().worker.max_failed_runs
    plan = []
    for key in expected:
        step = graph.get_step(key.kind)
        entry = entries.get((key.kind, key.config, key.split))
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
            plan.append(JobKey(key.kind, key.dataset, key.config, key.split))
    return plan
