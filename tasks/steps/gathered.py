"""dataset-split-names, dataset-parquet and dataset-info: the dataset level of /splits, /parquet and /info,
each its configs' entries gathered into one.

A config whose entry is not in the cache yet is `pending`, one whose entry is an error `failed`, as the
viewer's schemas say: on /splits a config's item (`{dataset, config}`, and the `error` of a failed one:
`{error, error_code}`), on /parquet and /info a job's (`{dataset, config, split: null, kind}`). `partial`
is true when a config's entry was cut (its conversion stopped at WORKER_PARQUET_MAX_BYTES) or any config
is pending or failed. A Parquet file's `path` stays relative to WORKER_PARQUET_DIRECTORY: the API adds its
`url` when it serves the answer, as it does for a config's.
"""

from __future__ import annotations

from typing import Any

from common.cache import CachedResponse, get_dataset_responses, get_response
from common.exceptions import CachedResponseNotFoundError
from common.redaction import redact
from tasks.step_task import StepJob

CONFIG_NAMES = "dataset-config-names"


def dataset_configs(job: StepJob) -> list[str]:
    """The dataset's configs, in order; the job's revision is the one they were listed at."""
    return [item["config"] for item in job.previous_step(CONFIG_NAMES)["config_names"]]


def current_entries(job: StepJob, kinds: list[str]) -> list[CachedResponse]:
    """The successful entries of these kinds of the dataset's current configs (an entry of a config the
    dataset no longer lists is left out), in the order of the configs."""
    configs = {config: index for index, config in enumerate(dataset_configs(job))}
    entries = [e for e in get_dataset_responses(job.dataset, kinds) if e.is_success and e.config in configs]
    return sorted(entries, key=lambda entry: configs[entry.config or ""])


def ancestor_content(kind: str, dataset: str, config: str | None = None) -> dict[str, Any]:
    """The content of an ancestor's entry when it succeeded, else nothing ({})."""
    try:
        entry = get_response(kind, dataset, config)
    except CachedResponseNotFoundError:
        return {}
    return entry.content if entry.is_success else {}


def error_of(entry: CachedResponse) -> dict[str, Any]:
    """A cached error as the API serves it: `{error, error_code}`, without local paths or the host name."""
    message = entry.content.get("error")
    return {"error": redact(message) if isinstance(message, str) else None, "error_code": entry.error_code}


def gather(job: StepJob, kind: str, field: str, by_config: bool = False, config_items: bool = False) -> dict[str, Any]:
    """The `field` of each config's `kind` entry, as a list (the configs' lists one after the other) or, with
    `by_config`, a mapping from the config to it; with `pending`, `failed` and `partial`."""
    configs = dataset_configs(job)
    entries = {entry.config: entry for entry in get_dataset_responses(job.dataset, [kind])}
    job.progress.update(1, 1, f"{len(configs)} config(s)")  # one read of the cache: the end
    values: list[Any] | dict[str, Any] = {} if by_config else []
    pending: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    partial = False
    for config in configs:
        entry = entries.get(config)
        item: dict[str, Any] = {"dataset": job.dataset, "config": config}
        if not config_items:
            item |= {"split": None, "kind": kind}
        if entry is None:
            pending.append(item)
            continue
        if not entry.is_success:
            failed.append(item | ({"error": error_of(entry)} if config_items else {}))
            continue
        partial = partial or bool(entry.content.get("partial", False))
        value = entry.content.get(field)
        if isinstance(values, dict):
            values[config] = value
        else:
            values.extend(value or [])
    return {field: values, "pending": pending, "failed": failed, "partial": partial or bool(pending or failed)}


def dataset_split_names(job: StepJob) -> dict[str, Any]:
    """{"splits": [{dataset, config, split}], "pending": [{dataset, config}], "failed": [{dataset, config,
    error}], "partial"}"""
    return gather(job, "config-split-names", "splits", config_items=True)


def dataset_parquet(job: StepJob) -> dict[str, Any]:
    """{"parquet_files": [{dataset, config, split, filename, path, size}], "pending": [job], "failed": [job],
    "partial"}"""
    return gather(job, "config-parquet", "parquet_files")


def dataset_info(job: StepJob) -> dict[str, Any]:
    """{"dataset_info": {config: info}, "pending": [job], "failed": [job], "partial"}"""
    return gather(job, "config-info", "dataset_info", by_config=True)
