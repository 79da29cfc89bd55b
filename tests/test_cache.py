from __future__ import annotations

import multiprocessing
import os
from http import HTTPStatus

import pytest
from pymongo import MongoClient

from common import cache
from common.cache_counts import CacheCount, kept_counts
from common.config import get_config
from common.exceptions import (
    CachedResponseNotFoundError,
    ContentNotStorableError,
    ContentTooBigError,
    InvalidDatasetNameError,
    InvalidSplitNameError,
    JobManagerCrashedError,
)
from tests.conftest import Stores


def test_an_upserted_response_reads_back(stores: Stores) -> None:
    cache.upsert_response(
        "dataset-config-names",
        "org/ds",
        {"configs": ["default"]},
        job_runner_version=2,
        dataset_git_revision="abc",
        duration=0.5,
    )
    entry = cache.get_response("dataset-config-names", "org/ds")
    assert entry.content == {"configs": ["default"]}
    assert entry.http_status == HTTPStatus.OK
    assert entry.is_success
    assert (entry.job_runner_version, entry.dataset_git_revision, entry.duration) == (2, "abc", 0.5)
    assert entry.progress == 1.0
    assert entry.failed_runs == 0
    assert entry.updated_at.tzinfo is not None


def test_upserting_the_same_response_twice_leaves_one_entry(stores: Stores) -> None:
    for _ in range(2):
        cache.upsert_response("config-split-names", "org/ds", {"splits": ["train"]}, config="default")
    assert len(cache.get_dataset_responses("org/ds")) == 1
    assert cache.get_response("config-split-names", "org/ds", "default").content == {"splits": ["train"]}


def test_there_is_one_entry_per_config_and_per_split(stores: Stores) -> None:
    for config in ("a", "b"):
        cache.upsert_response("config-split-names", "org/ds", {"splits": ["train", "test"]}, config=config)
        for split in ("train", "test"):
            cache.upsert_response("split-first-rows", "org/ds", {"rows": []}, config=config, split=split)
    entries = cache.get_dataset_responses("org/ds")
    assert len(entries) == 6
    assert [(e.kind, e.config, e.split) for e in entries][:2] == [
        ("config-split-names", "a", None),
        ("config-split-names", "b", None),
    ]


def test_a_missing_entry_is_a_typed_not_found_error(stores: Stores) -> None:
    cache.upsert_response("config-split-names", "org/ds", {"splits": []}, config="a")
    with pytest.raises(CachedResponseNotFoundError):
        cache.get_response("config-split-names", "org/ds", "b")
    with pytest.raises(CachedResponseNotFoundError):
        cache.get_response("dataset-config-names", "org/other")


def test_bad_names_are_refused_before_the_cache_is_touched(stores: Stores) -> None:
    with pytest.raises(InvalidDatasetNameError):
        cache.upsert_response("dataset-config-names", "../etc", {})
    with pytest.raises(InvalidSplitNameError):
        cache.upsert_response("split-first-rows", "org/ds", {}, split="train")
    assert cache.count_by_status() == []


def test_deleting_a_dataset_removes_only_its_entries(stores: Stores) -> None:
    for dataset in ("org/ds", "org/ds2", "other/ds"):
        cache.upsert_response("dataset-config-names", dataset, {"configs": []})
        cache.upsert_response("config-split-names", dataset, {"splits": []}, config="c")
    assert cache.delete_dataset_responses("org/ds") == 2
    assert cache.get_dataset_responses("org/ds") == []
    assert len(cache.get_dataset_responses("org/ds2")) == 2
    assert len(cache.get_dataset_responses("other/ds")) == 2


def test_errors_are_stored_with_their_code_and_counted_by_code(stores: Stores) -> None:
    crash = JobManagerCrashedError("the worker died", cause=RuntimeError("SIGKILL"))
    cache.upsert_error("split-first-rows", "org/ds", crash, config="c", split="s1")
    cache.upsert_error("split-first-rows", "org/ds", crash, config="c", split="s2")
    cache.upsert_error("split-first-rows", "org/ds", ContentTooBigError("too big"), config="c", split="s3")
    cache.upsert_response("split-first-rows", "org/ds", {"rows": []}, config="c", split="s4")
    entry = cache.get_response("split-first-rows", "org/ds", "c", "s1")
    assert entry.http_status == 500
    assert entry.error_code == "JobManagerCrashedError"
    assert entry.content == {"error": "the worker died"}
    assert entry.details == {
        "error": "the worker died",
        "cause_exception": "RuntimeError",
        "cause_message": "SIGKILL",
    }
    counts = {(c.http_status, c.error_code): c.count for c in cache.count_by_status("split-first-rows")}
    assert counts == {(200, None): 1, (500, "JobManagerCrashedError"): 2, (501, "ContentTooBigError"): 1}


def test_failed_runs_counts_consecutive_errors_of_one_revision(stores: Stores) -> None:
    def fail(revision: str) -> int:
        cache.upsert_error("dataset-config-names", "org/ds", JobManagerCrashedError("x"), dataset_git_revision=revision)
        return cache.get_response("dataset-config-names", "org/ds").failed_runs

    assert [fail("r1"), fail("r1"), fail("r1")] == [1, 2, 3]
    cache.upsert_response("dataset-config-names", "org/ds", {"configs": []}, dataset_git_revision="r1")
    assert cache.get_response("dataset-config-names", "org/ds").failed_runs == 0
    assert [fail("r1"), fail("r1")] == [1, 2]
    assert fail("r2") == 1


def test_content_over_the_max_bytes_is_refused_and_the_stored_entry_stays(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORKER_CONTENT_MAX_BYTES", "1000")
    get_config.cache_clear()
    cache.upsert_response("dataset-config-names", "org/ds", {"configs": ["small"]})
    with pytest.raises(ContentTooBigError) as raised:
        cache.upsert_response("dataset-config-names", "org/ds", {"configs": ["x" * 2000]})
    assert raised.value.http_status == 501
    assert cache.get_response("dataset-config-names", "org/ds").content == {"configs": ["small"]}


def test_content_that_is_no_document_is_a_typed_error(stores: Stores) -> None:
    with pytest.raises(ContentNotStorableError):
        cache.upsert_response("dataset-config-names", "org/ds", ["not", "a", "mapping"])  # type: ignore[arg-type]
    with pytest.raises(ContentNotStorableError):
        cache.upsert_response("dataset-config-names", "org/ds", {"a set": {1, 2}})
    assert cache.get_dataset_responses("org/ds") == []


def test_content_with_dollar_strings_is_stored_as_is(stores: Stores) -> None:
    content = {"template": "$price", "nested": [{"a": "$$NOW"}]}
    cache.upsert_response("dataset-config-names", "org/ds", content)
    assert cache.get_response("dataset-config-names", "org/ds").content == content


def test_the_key_index_is_unique_and_the_dataset_and_status_indexes_exist(stores: Stores) -> None:
    cache.upsert_response("dataset-config-names", "org/ds", {})
    indexes = cache.cache_collection().index_information()
    assert indexes["key"].get("unique") is True
    assert {"dataset", "status"} <= set(indexes)


def _upsert_many(worker: int, count: int) -> None:
    get_config.cache_clear()
    for i in range(count):
        cache.upsert_response("split-first-rows", "org/ds", {"worker": worker, "i": i}, config="c", split="s")


def test_concurrent_upserts_of_one_key_from_four_processes_leave_one_document(stores: Stores) -> None:
    cache.cache_collection()  # the parent touches Mongo before forking, as a Celery prefork parent may
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=_upsert_many, args=(worker, 25)) for worker in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    client: MongoClient[dict[str, object]] = MongoClient(stores.mongo_url)
    collection = client[stores.cache_database]["cachedResponses"]
    assert collection.count_documents({"kind": "split-first-rows", "dataset": "org/ds"}) == 1
    client.close()
    assert os.getpid()  # the parent's client still works after its children used theirs
    assert cache.get_response("split-first-rows", "org/ds", "c", "s").content["i"] == 24
    assert (
        kept_counts()
        == cache.count_by_status()
        == [CacheCount(kind="split-first-rows", http_status=200, error_code=None, count=1)]
    )
