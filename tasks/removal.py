"""Removing a dataset from stepcache: its entries, its jobs and its files.

:func:`remove_dataset` is what a webhook's `delete` does; :func:`prune` removes, in one pass over the
cache's dataset names, every dataset the source no longer has (`python -m tasks prune`, and `python -m
tasks run` when it starts): a mirror folder that holds or is inside another dataset's folder stopped
being a dataset, and the entries written under its name before are removed there.
"""

from __future__ import annotations

import logging
import shutil
from contextlib import suppress
from pathlib import Path
from typing import Any

from common import cache
from common.config import get_config
from common.exceptions import DatasetNotFoundError
from common.sources import DatasetSource

logger = logging.getLogger(__name__)


def dataset_directories(dataset: str) -> list[Path]:
    """Where the dataset's files are, and only its files: `<dataset>/--/...` (a canonical name's folder also
    holds its namespace's datasets)."""
    settings = get_config()
    return [settings.assets.storage_path / dataset / "--", settings.worker.parquet_path / dataset / "--"]


def remove_directory(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    with suppress(OSError):
        directory.parent.rmdir()  # the dataset's folder, once nothing else is in it


def remove_dataset(dataset: str) -> dict[str, Any]:
    """Its entries, then its jobs (running ones stopped), then its assets and Parquet files."""
    from tasks.queue import get_queue

    # Entries first, then jobs: an ending that enqueued children before the cancel finds its own entry
    # gone afterwards, and cancels them itself (orchestrator.after_job); a running attempt's write finds
    # no entry (a fenced write never creates one).
    deleted = cache.delete_dataset_responses(dataset)
    cancelled = get_queue().cancel(dataset, revoke_started=True)
    for directory in dataset_directories(dataset):
        remove_directory(directory)
    return {"cancelled": len(cancelled), "deleted": deleted}


def prune(source: DatasetSource, dry_run: bool = False) -> list[str]:
    """The datasets of the cache that the source does not have (removed, unless `dry_run`). A source that
    cannot answer for a dataset (the Hub down) keeps it."""
    gone = []
    for dataset in cache.dataset_names():
        try:
            source.access(dataset)
        except DatasetNotFoundError:
            gone.append(dataset)
            if not dry_run:
                logger.info("removing %s: %s", dataset, remove_dataset(dataset))
        except Exception:
            logger.warning("could not ask the source about %s: kept", dataset, exc_info=True)
    return gone
