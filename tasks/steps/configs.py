"""dataset-config-names and config-split-names: what a dataset holds, from its files' layout."""

from __future__ import annotations

from typing import Any

from common.exceptions import ConfigNotFoundError
from common.sources import Layout, SplitFiles, find_layout, get_source
from tasks.step_task import StepJob


def dataset_layout(job: StepJob) -> Layout:
    """The dataset's configs, splits and files, at the job's revision (which it records)."""
    job.revision  # noqa: B018  (looked up first: what the files are, is what this revision says)
    return find_layout(get_source().directory(job.dataset))


def config_layout(job: StepJob) -> dict[str, SplitFiles]:
    layout = dataset_layout(job)
    if job.config not in layout:
        raise ConfigNotFoundError(f"dataset {job.dataset!r} has no config {job.config!r}; it has {sorted(layout)}")
    return layout[job.config]


def dataset_config_names(job: StepJob) -> dict[str, Any]:
    """{"config_names": [{"dataset", "config"}]}"""
    return {"config_names": [{"dataset": job.dataset, "config": config} for config in dataset_layout(job)]}


def config_split_names(job: StepJob) -> dict[str, Any]:
    """{"splits": [{"dataset", "config", "split"}]}"""
    assert job.config is not None
    splits = config_layout(job)
    return {"splits": [{"dataset": job.dataset, "config": job.config, "split": split} for split in splits]}
