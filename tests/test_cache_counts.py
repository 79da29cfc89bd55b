"""The cache entries counted per kind, status and error code as they change (common/cache_counts.py)."""

from __future__ import annotations

import re

import pytest

from common import cache
from common.cache import Writer
from common.cache_counts import CacheCount, EntryStatus, add, counts_collection, kept_counts
from common.exceptions import DatasetNotFoundError, JobManagerCrashedError
from tasks import cli
from tests.conftest import Stores

CONFIGS = "dataset-config-names"
ROWS = "split-first-rows"


def counted() -> dict[tuple[str, int, str | None], int]:
    """The kept counts, checked against a count of the whole cache."""
    kept = kept_counts()
    assert kept == cache.count_by_status()
    return {(c.kind, c.http_status, c.error_code): c.count for c in kept}


def test_the_counts_follow_first_writes_overwrites_and_status_changes(stores: Stores) -> None:
    for split in ("a", "b", "c"):
        cache.upsert_response(ROWS, "org/ds", {"rows": []}, config="default", split=split)
    cache.upsert_response(CONFIGS, "org/ds", {"configs": ["default"]})
    assert counted() == {(CONFIGS, 200, None): 1, (ROWS, 200, None): 3}
    cache.upsert_response(ROWS, "org/ds", {"rows": [1]}, config="default", split="a")  # same status again
    cache.upsert_error(ROWS, "org/ds", JobManagerCrashedError("gone"), config="default", split="b")
    assert counted() == {(CONFIGS, 200, None): 1, (ROWS, 200, None): 2, (ROWS, 500, "JobManagerCrashedError"): 1}
    cache.upsert_error(ROWS, "org/ds", DatasetNotFoundError("no"), config="default", split="b")  # another code
    cache.upsert_response(ROWS, "org/ds", {"rows": []}, config="default", split="b")  # and a success again
    cache.upsert_error(ROWS, "org/ds", DatasetNotFoundError("no"), config="default", split="c")
    assert counted() == {(CONFIGS, 200, None): 1, (ROWS, 200, None): 2, (ROWS, 404, "DatasetNotFoundError"): 1}


def test_a_claim_is_counted_once_it_has_a_response_and_a_refused_write_counts_nothing(stores: Stores) -> None:
    first, second = Writer("job-1", 10), Writer("job-1", 20)
    assert not cache.upsert_response(CONFIGS, "org/ds", {"v": 0}, writer=first)  # never claimed: no entry
    assert cache.claim_entry(CONFIGS, "org/ds", None, None, first)
    assert counted() == {}  # a bare claim is no entry
    assert cache.upsert_response(CONFIGS, "org/ds", {"v": 1}, writer=first)
    assert counted() == {(CONFIGS, 200, None): 1}
    assert cache.claim_entry(CONFIGS, "org/ds", None, None, second)
    assert not cache.upsert_error(CONFIGS, "org/ds", JobManagerCrashedError("stale"), writer=first)
    assert counted() == {(CONFIGS, 200, None): 1}
    assert cache.upsert_error(CONFIGS, "org/ds", JobManagerCrashedError("late"), writer=second)
    assert counted() == {(CONFIGS, 500, "JobManagerCrashedError"): 1}
    assert cache.claim_entry(CONFIGS, "org/other", None, None, second)
    cache.release_claims(["job-1"])  # its bare claim goes, its entry stays
    assert counted() == {(CONFIGS, 500, "JobManagerCrashedError"): 1}


def test_the_counts_follow_deletions_of_entries_and_of_datasets(stores: Stores) -> None:
    for dataset in ("org/ds", "org/keep"):
        cache.upsert_response(CONFIGS, dataset, {"configs": ["default"]})
        for split in ("a", "b"):
            cache.upsert_response(ROWS, dataset, {"rows": []}, config="default", split=split)
        cache.upsert_error(ROWS, dataset, DatasetNotFoundError("no"), config="default", split="c")
    assert cache.claim_entry(ROWS, "org/ds", "default", "d", Writer("job-1", 1))  # a bare claim goes too
    assert cache.delete_response(ROWS, "org/keep", "default", "a")
    assert not cache.delete_response(ROWS, "org/keep", "default", "a")
    assert counted() == {(CONFIGS, 200, None): 2, (ROWS, 200, None): 3, (ROWS, 404, "DatasetNotFoundError"): 2}
    assert cache.delete_dataset_responses("org/ds") == 5
    assert cache.cache_collection().count_documents({"dataset": "org/ds"}) == 0
    assert counted() == {(CONFIGS, 200, None): 1, (ROWS, 200, None): 1, (ROWS, 404, "DatasetNotFoundError"): 1}
    assert cache.delete_dataset_responses("org/keep") == 3
    assert counted() == {}


def test_the_counts_follow_a_renamed_dataset_that_replaces_the_new_names_entries(stores: Stores) -> None:
    cache.upsert_response(CONFIGS, "org/old", {"configs": ["default"]})
    cache.upsert_error(ROWS, "org/old", DatasetNotFoundError("no"), config="default", split="a")
    cache.upsert_response(CONFIGS, "org/new", {"configs": ["other"]})  # replaced by old's
    cache.upsert_response(ROWS, "org/new", {"rows": []}, config="other", split="a")  # gone: old has none such
    assert cache.move_dataset_responses("org/old", "org/new", lambda content: content) == 2
    assert cache.get_response(CONFIGS, "org/new").content == {"configs": ["default"]}
    assert counted() == {(CONFIGS, 200, None): 1, (ROWS, 404, "DatasetNotFoundError"): 1}


def test_a_recount_repairs_counts_a_crash_left_off(stores: Stores) -> None:
    cache.upsert_response(CONFIGS, "org/ds", {"configs": ["default"]})
    cache.upsert_response(CONFIGS, "org/other", {"configs": ["default"]})
    # As a process killed between an entry's write and its count, and a count of a status no entry has.
    add({EntryStatus(CONFIGS, 200, None): -1, EntryStatus(ROWS, 500, "JobManagerCrashedError"): 2})
    assert kept_counts() != cache.count_by_status()
    assert cache.recount_entries() == [CacheCount(kind=CONFIGS, http_status=200, error_code=None, count=2)]
    assert counted() == {(CONFIGS, 200, None): 2}
    assert counts_collection().count_documents({}) == 1  # the stale status is gone, not kept at zero


def test_the_cli_shows_the_kept_counts_and_recounts_on_demand(
    stores: Stores, capsys: pytest.CaptureFixture[str]
) -> None:
    cache.upsert_error(ROWS, "org/ds", DatasetNotFoundError("no"), config="default", split="a")
    add({EntryStatus(ROWS, 404, "DatasetNotFoundError"): 4})  # off, as after a crash
    assert cli.main(["cache-counts"]) == 0
    assert re.search(r"split-first-rows\s+404\s+DatasetNotFoundError\s+5", capsys.readouterr().out)
    assert cli.main(["cache-counts", "--recount"]) == 0
    assert re.search(r"split-first-rows\s+404\s+DatasetNotFoundError\s+1", capsys.readouterr().out)
