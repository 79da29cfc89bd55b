"""dataset-configs-settled, config-is-valid, split-is-valid and dataset-is-valid: which of the viewer's views
of the data work, as its IsValidResponse says: `{preview, viewer, search, filter, statistics}`.

A split's flags come from which of its entries succeeded: `preview` its split-first-rows, `viewer` its
config's config-parquet (with a file of the split), `statistics` its split-descriptive-statistics, `search` and
`filter` its split-duckdb-index (what /search and /filter read). A config's flags are its
splits' flags or-ed, a dataset's its configs'. A failed or missing entry only turns its flag off: these
steps never fail because one of their inputs did.

dataset-configs-settled lists the dataset's configs once every entry of theirs is in the cache, computed or
failed (a fan-in): each then gets a config-is-valid, even a config whose conversion failed after its first
rows (a config-level failure is followed by no config-level job, a dataset-level fan-in is). config-is-valid
lists the splits its flags come from (`splits`, beside the five flags), each of which gets a
split-is-valid; dataset-is-valid is the fan-in of config-is-valid.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from common.cache import get_dataset_responses
from tasks.step_task import StepJob
from tasks.steps.gathered import ancestor_content, dataset_configs

FLAGS = ("preview", "viewer", "search", "filter", "statistics")
FIRST_ROWS, PARQUET, STATISTICS = "split-first-rows", "config-parquet", "split-descriptive-statistics"
INDEX = "split-duckdb-index"
SPLIT_NAMES = "config-split-names"


class ConfigEntries:
    """The entries a config's flags are read from: whether its splits' first rows, statistics and indexes
    succeeded (their metadata only: a first rows' content can be megabytes), its Parquet files and its split
    names."""

    def __init__(self, dataset: str, config: str) -> None:
        found = get_dataset_responses(dataset, (FIRST_ROWS, STATISTICS, INDEX), with_content=False)
        successes = [entry for entry in found if entry.config == config and entry.is_success]
        self.first_rows = {entry.split for entry in successes if entry.kind == FIRST_ROWS}
        self.statistics = {entry.split for entry in successes if entry.kind == STATISTICS}
        self.indexed = {entry.split for entry in successes if entry.kind == INDEX}
        parquet = ancestor_content(PARQUET, dataset, config)
        self.parquet = [file.get("split") for file in parquet.get("parquet_files") or []]
        listed = ancestor_content(SPLIT_NAMES, dataset, config)
        self.split_names = [item.get("split") for item in listed.get("splits") or []]

    def splits(self) -> list[str]:
        """The config's splits: those config-split-names lists, then any other a Parquet file is of."""
        names = [name for name in (*self.split_names, *self.parquet) if isinstance(name, str)]
        return list(dict.fromkeys(names))

    def flags(self, split: str) -> dict[str, bool]:
        return {
            "preview": split in self.first_rows,
            "viewer": split in self.parquet,
            "search": split in self.indexed,
            "filter": split in self.indexed,
            "statistics": split in self.statistics,
        }


def any_of(flags: Iterable[dict[str, Any]]) -> dict[str, bool]:
    """The flags or-ed (every flag false when there is none)."""
    listed = list(flags)
    return {flag: any(bool(item.get(flag)) for item in listed) for flag in FLAGS}


def split_is_valid(job: StepJob) -> dict[str, Any]:
    """{"preview", "viewer", "search", "filter", "statistics"} of the split."""
    assert job.config is not None and job.split is not None
    job.previous_step("config-is-valid", job.config)  # the revision this answer is about
    entries = ConfigEntries(job.dataset, job.config)
    job.progress.update(1, 1, "read the split's entries")  # one read of the cache: the end
    return entries.flags(job.split)


def dataset_configs_settled(job: StepJob) -> dict[str, Any]:
    """{"config_names": [{"dataset", "config"}]}: the configs, now that all their entries are in."""
    configs = dataset_configs(job)
    job.progress.update(1, 1, f"{len(configs)} config(s)")
    return {"config_names": [{"dataset": job.dataset, "config": config} for config in configs]}


def config_is_valid(job: StepJob) -> dict[str, Any]:
    """{"preview", "viewer", "search", "filter", "statistics", "splits": [split]}: the flags of its splits
    or-ed, and the splits (each gets a split-is-valid)."""
    assert job.config is not None
    job.previous_step("dataset-configs-settled")  # the revision this answer is about
    entries = ConfigEntries(job.dataset, job.config)
    splits = entries.splits()
    job.progress.update(1, 1, f"{len(splits)} split(s)")  # one read of the cache: the end
    return {**any_of(entries.flags(split) for split in splits), "splits": splits}


def dataset_is_valid(job: StepJob) -> dict[str, Any]:
    """{"preview", "viewer", "search", "filter", "statistics"}: its configs' config-is-valid or-ed (a
    config whose entry is missing or failed counts as nothing valid)."""
    configs = dataset_configs(job)
    entries = {e.config: e for e in get_dataset_responses(job.dataset, ["config-is-valid"]) if e.is_success}
    job.progress.update(1, 1, f"{len(configs)} config(s)")  # one read of the cache: the end
    return any_of(entries[config].content for config in configs if config in entries)
