"""The orchestrator's plans, pure: a graph and a snapshot of cache entries in, jobs and errors out (no server)."""

from __future__ import annotations

import dataclasses
import inspect
import re
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

import pytest

from common import orchestrator
from common.cache import CachedResponse
from common.exceptions import JobManagerCrashedError, ParentStepFailedError, StepcacheError
from common.orchestrator import JobKey, expected_entries, plan_after_failure, plan_after_success, plan_backfill
from common.processing_graph import DEFAULT_STEPS, InputType, ProcessingGraph, ProcessingStep

CORE_NAMES = {
    "dataset-config-names",
    "config-split-names",
    "split-first-rows",
    "config-parquet-and-info",
    "config-parquet",
    "config-info",
    "config-size",
    "dataset-size",
    "split-descriptive-statistics",
}
# The steps these plans were written for: the default graph's first ten, dataset-is-valid a fan-in of first
# rows and Parquet files; every step at version 1, as `entry` writes them (the plans are the graph's,
# whatever its steps and versions; tests/test_viewer_steps.py plans the default graph's later steps).
CORE_STEPS = (
    *(dataclasses.replace(step, job_runner_version=1) for step in DEFAULT_STEPS if step.name in CORE_NAMES),
    ProcessingStep("dataset-is-valid", InputType.DATASET, ("split-first-rows", "config-parquet")),
)
DEFAULT = ProcessingGraph(CORE_STEPS)
DATASET = "org/ds"


def entry(
    kind: str, content: dict[str, Any] | None = None, config: str | None = None, split: str | None = None, **fields: Any
) -> CachedResponse:
    values: dict[str, Any] = {
        "kind": kind,
        "dataset": DATASET,
        "config": config,
        "split": split,
        "content": content or {},
        "http_status": HTTPStatus.OK,
        "job_runner_version": 1,
        "updated_at": datetime.now(UTC),
    }
    return CachedResponse(**(values | fields))


def failed(kind: str, config: str | None = None, split: str | None = None, code: str = "SomeError") -> CachedResponse:
    return entry(kind, {"error": "no"}, config, split, http_status=HTTPStatus.INTERNAL_SERVER_ERROR, error_code=code)


CONFIGS = entry("dataset-config-names", {"config_names": [{"config": "a"}, {"config": "b"}]})
SPLITS_A = entry("config-split-names", {"splits": [{"split": "train"}, {"split": "test"}]}, "a")


def test_the_orchestrator_knows_no_step_name_and_no_content_shape() -> None:
    source = inspect.getsource(orchestrator)
    step_names = {step.name for step in DEFAULT_STEPS}
    assert not [name for name in step_names if name in source]
    for shape in ("config_names", "parquet_files", '"splits"', "'splits'"):
        assert shape not in source
    assert not re.search(r"content\[|content\.get\(", source)


def test_a_success_fans_out_to_what_its_content_lists_and_keeps_the_level_for_same_level_children() -> None:
    plan = plan_after_success(DEFAULT, JobKey("dataset-config-names", DATASET, None, None), CONFIGS.content, [CONFIGS])
    assert plan.errors == []
    assert plan.jobs == [
        JobKey("config-split-names", DATASET, "a", None),
        JobKey("config-split-names", DATASET, "b", None),
        JobKey("config-parquet-and-info", DATASET, "a", None),
        JobKey("config-parquet-and-info", DATASET, "b", None),
    ]
    splits = plan_after_success(
        DEFAULT, JobKey("config-split-names", DATASET, "a", None), SPLITS_A.content, [CONFIGS, SPLITS_A]
    )
    assert splits.jobs == [
        JobKey("split-first-rows", DATASET, "a", "train"),
        JobKey("split-first-rows", DATASET, "a", "test"),
    ]


def test_fan_in_waits_for_every_entry_of_its_ancestors() -> None:
    sizes = [entry("config-parquet-and-info", {}, c) for c in "ab"] + [entry("config-size", {}, "a")]
    key = JobKey("config-size", DATASET, "a", None)
    assert plan_after_success(DEFAULT, key, {}, [CONFIGS, *sizes]).jobs == []  # config b has no size yet
    sizes.append(entry("config-size", {}, "b"))
    assert plan_after_success(DEFAULT, key, {}, [CONFIGS, *sizes]).jobs == [JobKey("dataset-size", DATASET, None, None)]


def test_a_failure_caches_parent_failed_errors_below_it_and_enqueues_coarser_steps() -> None:
    # An earlier run had listed the split train (config-parquet) and computed test's statistics.
    earlier = [
        entry("config-parquet", {"parquet_files": [{"split": "train"}]}, "a"),
        entry("split-descriptive-statistics", {}, "a", "test"),
    ]
    entries = [CONFIGS, SPLITS_A, failed("config-parquet-and-info", "a"), *earlier]
    key = JobKey("config-parquet-and-info", DATASET, "a", None)
    error = JobManagerCrashedError("gone")
    plan = plan_after_failure(DEFAULT, key, error, entries)
    failed_keys = [child for child, _ in plan.errors]
    # Below the failed step: every entry its descendants had or would have, so no stale success stays.
    assert failed_keys == [
        JobKey("config-parquet", DATASET, "a", None),
        JobKey("split-descriptive-statistics", DATASET, "a", "train"),
        JobKey("split-descriptive-statistics", DATASET, "a", "test"),
        JobKey("config-info", DATASET, "a", None),
        JobKey("config-size", DATASET, "a", None),
    ]
    assert all(isinstance(cause, ParentStepFailedError) for _, cause in plan.errors)
    assert "config-parquet-and-info" in plan.errors[0][1].message
    # dataset-is-valid and dataset-size are coarser: not ready (config b is missing), so not enqueued yet.
    assert plan.jobs == []
    # A first run lists nothing below config-parquet: no split-level error is made up.
    first = plan_after_failure(DEFAULT, key, error, [CONFIGS, SPLITS_A])
    assert [child.step for child, _ in first.errors] == ["config-parquet", "config-info", "config-size"]


def test_a_dataset_level_failure_fails_every_dataset_level_descendant() -> None:
    plan = plan_after_failure(
        DEFAULT, JobKey("dataset-config-names", DATASET, None, None), JobManagerCrashedError("x"), []
    )
    assert sorted(child.step for child, _ in plan.errors) == ["dataset-is-valid", "dataset-size"]


def test_a_user_steps_fan_out_by_field_path_or_function() -> None:
    graph = (
        DEFAULT.with_step(ProcessingStep("dataset-tables", InputType.DATASET, fan_out="tables.name"))
        .with_step(
            ProcessingStep(
                "config-rows", InputType.CONFIG, ("dataset-tables",), fan_out=lambda content: content["parts"]
            )
        )
        .with_step(ProcessingStep("split-cells", InputType.SPLIT, ("config-rows",)))
    )
    content = {"tables": [{"name": "t1"}, {"name": "t2"}]}
    plan = plan_after_success(graph, JobKey("dataset-tables", DATASET, None, None), content, [])
    assert plan.jobs == [JobKey("config-rows", DATASET, "t1", None), JobKey("config-rows", DATASET, "t2", None)]
    rows = plan_after_success(graph, JobKey("config-rows", DATASET, "t1", None), {"parts": ["p1"]}, [])
    assert rows.jobs == [JobKey("split-cells", DATASET, "t1", "p1")]


def keys(graph: ProcessingGraph, entries: list[CachedResponse], kind: str) -> list[tuple[str | None, str | None]]:
    return [(key.config, key.split) for key in expected_entries(graph, DATASET, entries) if key.kind == kind]


def test_expected_entries_follow_what_each_steps_source_lists() -> None:
    assert keys(DEFAULT, [], "config-split-names") == []
    assert keys(DEFAULT, [CONFIGS, SPLITS_A], "config-info") == [("a", None), ("b", None)]
    assert keys(DEFAULT, [CONFIGS, SPLITS_A], "split-first-rows") == [("a", "train"), ("a", "test")]
    # split-descriptive-statistics runs on what config-parquet lists, not on config-split-names' splits.
    assert keys(DEFAULT, [CONFIGS, SPLITS_A], "split-descriptive-statistics") == []
    parquet = entry("config-parquet", {"parquet_files": [{"split": "train"}]}, "b")
    assert keys(DEFAULT, [CONFIGS, SPLITS_A, parquet], "split-descriptive-statistics") == [("b", "train")]
    assert keys(DEFAULT, [failed("dataset-config-names")], "config-info") == []
    # A malformed old entry lists nothing, instead of failing the plan.
    assert keys(DEFAULT, [entry("dataset-config-names", {"config_names": [{"config": 1}]})], "config-info") == []


def test_a_users_fan_out_beside_the_default_pipeline_has_its_own_configs() -> None:
    graph = (
        DEFAULT.with_step(ProcessingStep("dataset-tables", InputType.DATASET, fan_out="tables"))
        .with_step(ProcessingStep("config-rows", InputType.CONFIG, ("dataset-tables",)))
        .with_step(ProcessingStep("dataset-total", InputType.DATASET, ("config-rows",)))
    )
    tables = entry("dataset-tables", {"tables": ["t1", "t2"]})
    rows = [entry("config-rows", {}, "t1")]
    entries = [CONFIGS, tables, *rows]
    assert keys(graph, entries, "config-rows") == [("t1", None), ("t2", None)]
    assert keys(graph, entries, "config-info") == [("a", None), ("b", None)]
    key = JobKey("config-rows", DATASET, "t1", None)
    assert plan_after_success(graph, key, {}, entries).jobs == []  # t2 is missing
    entries.append(entry("config-rows", {}, "t2"))
    assert plan_after_success(graph, key, {}, entries).jobs == [JobKey("dataset-total", DATASET, None, None)]
    assert [job.step for job in plan_backfill(graph, DATASET, entries, None, 3).jobs if "rows" in job.step] == []


def test_when_config_split_names_failed_dataset_is_valid_still_comes_once_config_parquet_is_there() -> None:
    entries = [
        CONFIGS.model_copy(update={"content": {"config_names": [{"config": "a"}]}}),
        failed("config-split-names", "a"),
        entry("config-parquet-and-info", {}, "a"),
        entry("config-parquet", {"parquet_files": [{"split": "train"}]}, "a"),
    ]
    plan = plan_after_success(DEFAULT, JobKey("config-parquet", DATASET, "a", None), entries[-1].content, entries)
    assert JobKey("dataset-is-valid", DATASET, None, None) in plan.jobs


def test_backfill_plans_missing_obsolete_stale_and_retryable_entries() -> None:
    assert plan_backfill(DEFAULT, DATASET, [], None, 3).jobs == [JobKey("dataset-config-names", DATASET, None, None)]
    entries = [
        entry("dataset-config-names", CONFIGS.content, dataset_git_revision="r1"),
        entry("config-split-names", SPLITS_A.content, "a", dataset_git_revision="r0"),  # stale
        failed("config-split-names", "b", code="JobManagerCrashedError"),  # retryable
        entry("config-parquet-and-info", {}, "a", job_runner_version=0),  # obsolete
        failed("config-parquet-and-info", "b", code="NotRetryable"),
    ]
    planned = plan_backfill(DEFAULT, DATASET, entries, "r1", 3).jobs
    assert JobKey("config-split-names", DATASET, "a", None) in planned
    assert JobKey("config-split-names", DATASET, "b", None) in planned
    assert JobKey("config-parquet-and-info", DATASET, "a", None) in planned
    assert JobKey("config-parquet-and-info", DATASET, "b", None) not in planned
    assert JobKey("dataset-config-names", DATASET, None, None) not in planned
    # Nothing below what is planned: config-split-names of a lists the splits anew, then its end enqueues them.
    assert JobKey("split-first-rows", DATASET, "a", "train") not in planned
    # Missing split-level entries are planned once their parents are done, and current.
    current = [entries[0], entry("config-split-names", SPLITS_A.content, "a", dataset_git_revision="r1")]
    assert JobKey("split-first-rows", DATASET, "a", "train") in plan_backfill(DEFAULT, DATASET, current, "r1", 3).jobs
    exhausted = [
        *entries[:2],
        failed("config-split-names", "b", code="JobManagerCrashedError").model_copy(update={"failed_runs": 3}),
    ]
    assert (
        JobKey("config-split-names", DATASET, "b", None) not in plan_backfill(DEFAULT, DATASET, exhausted, "r1", 3).jobs
    )


def computed(revision: str) -> list[CachedResponse]:
    """Every entry the default graph expects of a dataset with config a (splits train and test), at `revision`."""
    splits = [{"split": "train"}, {"split": "test"}]
    contents = {
        "dataset-config-names": {"config_names": [{"config": "a"}]},
        "config-split-names": {"splits": splits},
        "config-parquet": {"parquet_files": splits},
    }
    return [
        entry(key.kind, contents.get(key.kind, {}), key.config, key.split, dataset_git_revision=revision)
        for key in DEFAULT.expected_entries(DATASET, {"a": ["train", "test"]})
    ]


def replaced(entries: list[CachedResponse], kind: str, config: str | None, split: str | None, **fields: Any) -> None:
    index = next(i for i, e in enumerate(entries) if (e.kind, e.config, e.split) == (kind, config, split))
    entries[index] = entries[index].model_copy(update=fields)


def test_a_backfill_of_a_changed_dataset_plans_its_root_only() -> None:
    """Every entry is stale: each of its descendants would run on its parents' old output, then again on
    their new one. The root's end enqueues them, once each."""
    entries = computed("r1")
    assert len(entries) == 12
    assert plan_backfill(DEFAULT, DATASET, entries, "r2", 3).jobs == [
        JobKey("dataset-config-names", DATASET, None, None)
    ]


def test_a_backfill_plans_the_topmost_stale_entries_and_nothing_below_them() -> None:
    entries = computed("r1")
    replaced(entries, "config-parquet-and-info", "a", None, job_runner_version=0)  # obsolete
    replaced(entries, "split-first-rows", "a", "test", job_runner_version=0)  # obsolete, not below the other
    replaced(entries, "config-size", "a", None, job_runner_version=0)  # below config-parquet-and-info
    planned = plan_backfill(DEFAULT, DATASET, entries, "r1", 3).jobs
    assert planned == [
        JobKey("split-first-rows", DATASET, "a", "test"),
        JobKey("config-parquet-and-info", DATASET, "a", None),
    ]


def test_a_backfill_plans_nothing_in_process_nor_below_it() -> None:
    """A job of the entry, or of an entry above it, waits, runs, or ended and has its next steps still to
    enqueue: that end enqueues them."""
    entries = computed("r1")
    replaced(entries, "config-parquet", "a", None, job_runner_version=0)
    replaced(entries, "split-first-rows", "a", "train", dataset_git_revision="r0")
    obsolete = [JobKey("config-parquet", DATASET, "a", None), JobKey("split-first-rows", DATASET, "a", "train")]
    assert plan_backfill(DEFAULT, DATASET, entries, "r1", 3).jobs == obsolete[::-1]
    for in_process in (
        ("config-parquet", "a", None),
        ("config-parquet-and-info", "a", None),
        ("dataset-config-names", None, None),
    ):
        planned = plan_backfill(DEFAULT, DATASET, entries, "r1", 3, [in_process]).jobs
        assert JobKey("config-parquet", DATASET, "a", None) not in planned, in_process
    # Another split's job is not an input of this split's entry; the config's is.
    other_split = plan_backfill(DEFAULT, DATASET, entries, "r1", 3, [("split-first-rows", "a", "test")]).jobs
    assert JobKey("split-first-rows", DATASET, "a", "train") in other_split
    config = plan_backfill(DEFAULT, DATASET, entries, "r1", 3, [("config-split-names", "a", None)]).jobs
    assert config == [JobKey("config-parquet", DATASET, "a", None)]


def test_a_fan_in_child_waits_until_every_input_is_at_the_endings_revision_and_version() -> None:
    """dataset-is-valid's inputs are recomputed after a change: only the end of the last one enqueues it."""
    entries = computed("r2")
    replaced(entries, "config-parquet", "a", None, dataset_git_revision="r1")
    key = JobKey("split-first-rows", DATASET, "a", "test")
    valid = JobKey("dataset-is-valid", DATASET, None, None)
    assert valid not in plan_after_success(DEFAULT, key, {}, entries).jobs  # config-parquet is of r1 still
    replaced(entries, "config-parquet", "a", None, dataset_git_revision="r2", job_runner_version=0)
    assert valid not in plan_after_success(DEFAULT, key, {}, entries).jobs  # ... or of an older version
    replaced(entries, "config-parquet", "a", None, job_runner_version=1)
    assert valid in plan_after_success(DEFAULT, key, {}, entries).jobs


def test_planning_needs_no_server() -> None:
    # The planning functions take everything as arguments: no cache, queue or settings read.
    for function in (plan_after_success, plan_after_failure, plan_backfill, expected_entries):
        source = inspect.getsource(function)
        assert "cache." not in source.replace("cache.CachedResponse", "") and "get_config" not in source


def test_a_step_error_type_is_stepcache_error() -> None:
    with pytest.raises(StepcacheError):
        ProcessingStep("dataset-x", InputType.DATASET, fan_out="a").names_in({"a": [1]})


def test_the_errors_a_parents_plan_caches_carry_its_endings_fence(stores: Any) -> None:
    """A child's ParentStepFailedError is an effect of its parent's ending: stamped with that ending's fence,
    like every entry an ended job writes (tests/test_chaos.py checks it of every entry)."""
    from common import cache
    from tasks.queue import get_queue

    failure = ParentStepFailedError("not computed: 'split-first-rows' failed with UnexpectedError")
    plan = orchestrator.Plan(errors=[(JobKey("split-image-url-columns", "org/ds", "default", "train"), failure)])
    orchestrator.run_plan(plan, get_queue(), parent=orchestrator.Parent("parent-job", 4242))
    entry = cache.get_response("split-image-url-columns", "org/ds", "default", "train")
    assert (entry.error_code, entry.fence) == ("ParentStepFailedError", 4242)


def test_a_fan_in_completed_by_two_endings_at_once_is_enqueued(stores: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CI run that found it: org/corrupted's dataset-configs-settled never ran. Its conversion failed
    (its plan reads the cache, then caches ParentStepFailedError for config-parquet, -info and -size) while
    split-image-url-columns succeeded: that ending wrote its entry after the failure's plan read the cache,
    and read the cache before the failure's errors landed, so each saw the fan-in incomplete. The failure
    reads the cache again once its errors are in: now it sees the other entry and enqueues the fan-in."""
    from common import cache
    from common.exceptions import DatasetGenerationError
    from tasks.queue import get_queue

    def write(kind: str, content: dict[str, Any], config: str | None = None, split: str | None = None) -> None:
        cache.upsert_response(kind, DATASET, content, config=config, split=split, job_runner_version=9)

    write("dataset-config-names", {"config_names": [{"dataset": DATASET, "config": "default"}]})
    write("config-split-names", {"splits": [{"dataset": DATASET, "config": "default", "split": "train"}]}, "default")
    write("split-first-rows", {"rows": []}, "default", "train")
    write("dataset-split-names", {})
    failure = DatasetGenerationError("the file is corrupted")
    cache.upsert_error("config-parquet-and-info", DATASET, failure, config="default", job_runner_version=9)
    read = cache.get_dataset_responses

    def the_other_ending_lands_after_this_read(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(cache, "get_dataset_responses", read)
        entries = read(*args, **kwargs)
        write("split-image-url-columns", {"columns": []}, "default", "train")  # its plan then sees no errors
        return entries

    monkeypatch.setattr(cache, "get_dataset_responses", the_other_ending_lands_after_this_read)
    key = JobKey("config-parquet-and-info", DATASET, "default", None)
    jobs = orchestrator.after_job(get_queue(), key, None, failure, "normal")
    assert ("dataset-configs-settled", None, None) in {(job.step, job.config, job.split) for job in jobs}


def test_two_endings_that_find_a_fan_in_ready_on_the_same_entries_enqueue_it_once(stores: Any) -> None:
    """Each ending reads the cache after its own entry is in: the last two to end may both find the fan-in
    ready (a test saw dataset-configs-settled, then config-is-valid and split-is-valid, run twice after a
    backfill). Its job id is named by the entries it is ready on: the second ending's is the first's."""
    from common import cache
    from tests.test_queue import make_queue, run

    def write(kind: str, content: dict[str, Any], config: str | None = None, split: str | None = None) -> None:
        cache.upsert_response(kind, DATASET, content, config=config, split=split, job_runner_version=9)

    write("dataset-config-names", {"config_names": [{"dataset": DATASET, "config": "default"}]})
    write("config-split-names", {"splits": [{"dataset": DATASET, "config": "default", "split": "train"}]}, "default")
    write("config-parquet-and-info", {}, "default")
    files = {"parquet_files": [{"split": "train"}], "parquet_files_metadata": [{"split": "train"}]}
    for kind in ("config-parquet", "config-info", "config-size", "config-parquet-metadata"):
        write(kind, files, "default")
    for kind in ("split-first-rows", "split-image-url-columns", "split-descriptive-statistics", "split-duckdb-index"):
        write(kind, {}, "default", "train")
    jobs, dispatcher = make_queue(limit=4)
    ended = JobKey("split-duckdb-index", DATASET, "default", "train")
    first = orchestrator.after_job(jobs.queue, ended, {}, None, "normal", orchestrator.Parent("a", 1))
    (settled,) = [job for job in first if job.step == "dataset-configs-settled"]
    for dispatch in dispatcher.take():  # it runs and ends before the other ending plans
        if dispatch.payload.job_id == settled.job_id:
            run(jobs, dispatch)
    assert jobs.job(settled.job_id).status.is_terminal
    other = JobKey("split-descriptive-statistics", DATASET, "default", "train")
    second = orchestrator.after_job(jobs.queue, other, {}, None, "normal", orchestrator.Parent("b", 2))
    assert [job.job_id for job in second if job.step == "dataset-configs-settled"] == [settled.job_id]
    assert [job.step for job in jobs.jobs(DATASET)].count("dataset-configs-settled") == 1
