"""split-first-rows: the features and the first rows of a split, read in streaming mode.

Only the first WORKER_FIRST_ROWS_MAX_ROWS rows are read (plus one, to know whether there are more), and
only their media files are fetched. Image and audio cells are written to the asset storage and replaced by
their URLs. A string cell longer than WORKER_FIRST_ROWS_MAX_CELL_BYTES is cut there; when the rows are
still too big for WORKER_FIRST_ROWS_MAX_BYTES, the longest cells are cut to WORKER_FIRST_ROWS_MIN_CELL_BYTES
and, if that is not enough, rows are dropped from the end. Cut cells are named in the row's
`truncated_cells`; `truncated` says the split has more rows than the response.

The features are `datasets`'s (`Features.to_dict()`), as the viewer lists them; an Audio feature that does
not say its sampling rate gets the one its first file's header gives (the viewer's FeatureItem has one).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from common.assets import CellLocation
from common.config import get_config
from common.exceptions import TooManyColumnsError
from common.rows import Truncation, row_item, truncate, with_sampling_rates
from common.tables import column_kind, features
from tasks.step_task import StepJob
from tasks.steps.configs import open_job_split


def split_first_rows(job: StepJob) -> dict[str, Any]:
    assert job.config is not None and job.split is not None
    settings = get_config().worker
    split = open_job_split(job)
    if len(split.features) > settings.first_rows_max_columns:
        raise TooManyColumnsError(
            f"the split has {len(split.features)} columns, more than WORKER_FIRST_ROWS_MAX_COLUMNS="
            f"{settings.first_rows_max_columns}"
        )
    job.progress.update(0, 1, f"reading the first rows of split {job.split}")
    first = next(split.batches(settings.first_rows_max_rows + 1), None)  # nothing after it is read
    more = first is not None and first.num_rows > settings.first_rows_max_rows
    records = split.embed(first.slice(0, settings.first_rows_max_rows)).to_pylist() if first is not None else []
    kinds = {name: column_kind(feature) for name, feature in split.features.items()}
    location = partial(CellLocation, job.dataset, job.revision, job.config, job.split)
    rows = []
    for index, record in enumerate(records):
        rows.append(row_item(index, record, kinds, location))
        # one row at a time: image and audio cells are written to the asset storage
        job.progress.update(index + 1, len(records) + 1, f"row {index + 1} of {len(records)}")
    dropped = truncate(rows, Truncation.of(settings))
    job.progress.update(1, 1, f"{len(rows)} rows")
    return {
        "dataset": job.dataset,
        "config": job.config,
        "split": job.split,
        "features": with_sampling_rates(features(split.features), records),
        "rows": rows,
        "truncated": dropped or more,
    }
