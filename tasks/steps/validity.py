"""dataset-is-valid: whether a viewer (Parquet files) and a preview (first rows) can be shown."""

from __future__ import annotations

from typing import Any

from common.cache import get_dataset_responses
from tasks.step_task import StepJob


def dataset_is_valid(job: StepJob) -> dict[str, Any]:
    job.previous_step("dataset-config-names")  # the revision this answer is about
    entries = get_dataset_responses(job.dataset)
    job.progress.update(1, 1, f"{len(entries)} cache entries")  # one read of the cache: the end
    preview = any(e.kind == "split-first-rows" and e.is_success for e in entries)
    viewer = any(e.kind == "config-parquet" and e.is_success and e.content.get("parquet_files") for e in entries)
    return {"viewer": viewer, "preview": preview}
