"""dataset-config-names and config-split-names: what a dataset holds, as `datasets` reads it."""

from __future__ import annotations

import contextlib
from typing import Any

from common.exceptions import CacheableError
from common.reading import Split, config_names, open_split, split_names
from common.sources import Location, get_source
from tasks.step_task import StepJob


def location(job: StepJob) -> Location:
    """Where the dataset is read at the job's revision (which the job records): the revision its parent's
    entry was computed at (no Hub call, no walk of a mirror), or else the source's current one."""
    if job.known_revision is None and job.config is not None:
        parent = ("config-split-names", job.config) if job.split is not None else ("dataset-config-names", None)
        with contextlib.suppress(CacheableError):  # no usable parent entry: the source says
            job.previous_step(*parent)
    return get_source().locate(job.dataset, job.revision)


def open_job_split(job: StepJob, split: str | None = None) -> Split:
    """The job's split (or `split` of the job's config), open for streaming."""
    assert job.config is not None
    split = split or job.split
    assert split is not None
    return open_split(get_source(), location(job), job.config, split)


def job_split_names(job: StepJob) -> list[str]:
    assert job.config is not None
    return split_names(get_source(), location(job), job.config)


def dataset_config_names(job: StepJob) -> dict[str, Any]:
    """{"config_names": [{"dataset", "config"}]}"""
    job.progress.update(0, 1, "reading the dataset's configs")
    names = config_names(get_source(), location(job))
    job.progress.update(1, 1, f"{len(names)} config(s)")
    return {"config_names": [{"dataset": job.dataset, "config": config} for config in names]}


def config_split_names(job: StepJob) -> dict[str, Any]:
    """{"splits": [{"dataset", "config", "split"}]}"""
    job.progress.update(0, 1, "reading the config's splits")
    names = job_split_names(job)
    job.progress.update(1, 1, f"{len(names)} split(s)")
    return {"splits": [{"dataset": job.dataset, "config": job.config, "split": split} for split in names]}
