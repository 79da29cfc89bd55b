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
    job.progress.update(0, 1, "reading the dataset's files")
    layout = dataset_layout(job)
    config_names = []
    for index, config in enumerate(layout):
        config_names.append({"dataset": job.dataset, "config": config})
        job.progress.update(index + 1, len(layout), f"config {config}")
    return {"config_names": config_names}


def config_split_names(job: StepJob) -> dict[str, Any]:
    """{"splits": [{"dataset", "config", "split"}]}"""
    assert job.config is not None
    job.progress.update(0, 1, "reading the dataset's files")
    splits = []
    layout = config_layout(job)
    for index, split in enumerate(layout):
        splits.append({"dataset": job.dataset, "config": job.config, "split": split})
        job.progress.update(index + 1, len(layout), f"split {split}")
    return {"splits": splits}
