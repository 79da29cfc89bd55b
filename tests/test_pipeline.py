"""The processing steps on datasets the tests create, through the queue and Celery's in-process worker."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import common.processing_graph as graph_module
from common import cache, orchestrator
from common.assets import CellLocation
from common.config import get_config
from common.exceptions import JobManagerCrashedError
from common.processing_graph import get_processing_graph
from tasks import samples, steps
from tasks.queue import get_queue
from tests.conftest import Stores, use_settings

TIMEOUT = 120.0


def use_pipeline_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, endpoint: str, **more: str
) -> dict[str, str]:
    """The settings a pipeline test reads datasets with, from `endpoint`: its own assets and Parquet
    directories under tmp_path, and 4 jobs at once per namespace."""
    return use_settings(
        monkeypatch,
        {
            "COMMON_HF_ENDPOINT": endpoint,
            "ASSETS_STORAGE_DIRECTORY": str(tmp_path / "assets"),
            "WORKER_PARQUET_DIRECTORY": str(tmp_path / "parquet"),
            "QUEUE_MAX_JOBS_PER_NAMESPACE": "4",
            **more,
        },
    )


@pytest.fixture
def mirror(stores: Stores, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "mirror"
    root.mkdir()
    use_pipeline_settings(monkeypatch, tmp_path, f"file://{root}")
    yield root
    get_config.cache_clear()


def run_pipeline(
    dataset: str, timeout: float = TIMEOUT
) -> dict[tuple[str, str | None, str | None], cache.CachedResponse]:
    """Enqueue the root step and wait until the graph has nothing left to do for the dataset."""
    steps.dataset_config_names.delay(dataset)
    return wait_until_settled(dataset, timeout)


def wait_until_settled(
    dataset: str, timeout: float = TIMEOUT
) -> dict[tuple[str, str | None, str | None], cache.CachedResponse]:
    queue, graph = get_queue(), get_processing_graph()
    deadline, quiet_since = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        entries = {(e.kind, e.config, e.split): e for e in cache.get_dataset_responses(dataset)}
        expected = orchestrator.expected_entries(graph, dataset, entries.values())
        defaults = [k for k in expected if not k.kind.startswith(("test-", "bench-"))]
        # What the backfill reads too: a job that ended has its effects (its next steps, the errors its
        # descendants inherit) still to apply until the ledger says otherwise.
        busy = queue.in_process(dataset)
        settled = not busy and all((k.kind, k.config, k.split) in entries for k in defaults)
        if settled:
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since > 0.3:  # children are enqueued just after a job ends
                return entries
        else:
            quiet_since = None
        time.sleep(0.05)
    raise AssertionError(f"the pipeline of {dataset} did not settle: {sorted(entries)}")


def content(
    entries: dict[Any, cache.CachedResponse], kind: str, config: str | None = None, split: str | None = None
) -> Any:
    entry = entries[(kind, config, split)]
    assert entry.is_success, (kind, entry.error_code, entry.content)
    return entry.content


def test_a_csv_dataset_gets_every_entry_the_graph_expects(mirror: Path, celery_worker: object) -> None:
    dataset = samples.csv_dataset(mirror)
    entries = run_pipeline(dataset)
    assert all(entry.is_success for entry in entries.values()), [
        (k, e.error_code) for k, e in entries.items() if not e.is_success
    ]
    assert len(entries) == 12 + 7 + 5 * 2  # dataset-level, config-level, split-level entries
    assert content(entries, "dataset-config-names") == {"config_names": [{"dataset": dataset, "config": "default"}]}
    assert [s["split"] for s in content(entries, "config-split-names", "default")["splits"]] == ["train", "test"]
    first_rows = content(entries, "split-first-rows", "default", "train")
    assert [f["name"] for f in first_rows["features"]] == ["id", "text", "score", "flag"]
    assert first_rows["features"][0]["type"] == {"_type": "Value", "dtype": "int64"}
    assert len(first_rows["rows"]) == 100 and first_rows["truncated"] is True
    assert first_rows["rows"][3]["row"] == {"id": 3, "text": "row 3", "score": 1.5, "flag": False}
    parquet = content(entries, "config-parquet", "default")["parquet_files"]
    assert sorted(f["split"] for f in parquet) == ["test", "train"]
    storage = get_config().worker.parquet_path  # the paths are relative to it: no answer names a worker's disk
    assert all(not Path(f["path"]).is_absolute() and (storage / f["path"]).is_file() for f in parquet)
    size = content(entries, "dataset-size")
    assert size["size"]["dataset"]["num_rows"] == 152 and size["partial"] is False
    statistics = {
        c["column_name"]: c for c in content(entries, "split-descriptive-statistics", "default", "train")["statistics"]
    }
    assert statistics["id"]["column_statistics"]["min"] == 0 and statistics["id"]["column_statistics"]["max"] == 149
    assert statistics["text"]["column_type"] == "string_text"  # the viewer's column types
    assert statistics["flag"]["column_statistics"]["frequencies"] == {"False": 75, "True": 75}
    assert sum(statistics["score"]["column_statistics"]["histogram"]["hist"]) == 150
    assert content(entries, "dataset-is-valid") == {
        "preview": True,
        "viewer": True,
        "search": True,
        "filter": True,
        "statistics": True,
    }
    revision = entries[("dataset-config-names", None, None)].dataset_git_revision
    assert revision and all(
        e.dataset_git_revision == revision for e in entries.values() if e.kind != "dataset-is-valid"
    )


def test_json_lines_parquet_and_multi_config_datasets(mirror: Path, celery_worker: object) -> None:
    jsonl = run_pipeline(samples.jsonl_dataset(mirror))
    assert content(jsonl, "config-size", "default")["size"]["config"]["num_rows"] == 8
    rows = content(jsonl, "split-first-rows", "default", "test")["rows"]
    assert rows[0]["row"] == {"question": "q0?", "answer": 0}
    parquet = run_pipeline(samples.parquet_dataset(mirror))
    assert content(parquet, "split-first-rows", "default", "train")["rows"][19]["row"] == {"x": 19, "y": "s19"}
    multi = run_pipeline(samples.multi_config_dataset(mirror))
    assert [c["config"] for c in content(multi, "dataset-config-names")["config_names"]] == ["en", "fr"]
    assert [s["split"] for s in content(multi, "config-split-names", "fr")["splits"]] == ["train", "test"]
    assert content(multi, "dataset-size")["size"]["dataset"]["num_rows"] == 4


def test_image_and_audio_cells_become_files_under_the_assets_directory(mirror: Path, celery_worker: object) -> None:
    images = run_pipeline(samples.image_dataset(mirror))
    first_rows = content(images, "split-first-rows", "default", "train")
    assert [f["type"] for f in first_rows["features"]] == [
        {"_type": "Image"},
        {"_type": "ClassLabel", "names": ["cat", "dog"]},
    ]
    cell = first_rows["rows"][0]["row"]["image"]
    revision = images[("split-first-rows", "default", "train")].dataset_git_revision
    assert cell["src"] == f"assets/org/images/--/{revision}/--/default/train/0/image/image.jpg"
    assert (cell["width"], cell["height"]) == (8, 6)
    assert (Path(get_config().assets.storage_path) / cell["src"].removeprefix("assets/")).is_file()
    labels = next(
        c
        for c in content(images, "split-descriptive-statistics", "default", "train")["statistics"]
        if c["column_name"] == "label"
    )
    assert labels["column_statistics"]["frequencies"] == {"cat": 1, "dog": 2}
    audio = run_pipeline(samples.audio_dataset(mirror))
    (audio_cell,) = content(audio, "split-first-rows", "default", "train")["rows"][0]["row"]["audio"]
    assert audio_cell["type"] == "audio/wav" and audio_cell["src"].endswith("/0/audio/audio.wav")
    assert (Path(get_config().assets.storage_path) / audio_cell["src"].removeprefix("assets/")).is_file()


def test_bad_datasets_get_typed_cached_errors(mirror: Path, celery_worker: object) -> None:
    missing = run_pipeline("org/missing")
    assert missing[("dataset-config-names", None, None)].error_code == "DatasetNotFoundError"
    assert missing[("dataset-config-names", None, None)].http_status == 404
    empty = run_pipeline(samples.empty_dataset(mirror))
    assert empty[("dataset-config-names", None, None)].error_code == "EmptyDatasetError"
    assert empty[("dataset-is-valid", None, None)].error_code == "ParentStepFailedError"
    assert len(empty) == 12  # nothing to fan out to: the dataset-level descendants say why
    corrupted_name = samples.corrupted_dataset(mirror)
    corrupted = run_pipeline(corrupted_name)
    assert corrupted[("split-first-rows", "default", "train")].error_code == "DatasetGenerationError"
    assert corrupted[("config-parquet-and-info", "default", None)].error_code == "DatasetGenerationError"
    child = corrupted[("config-size", "default", None)]
    assert child.error_code == "ParentStepFailedError" and "config-parquet-and-info" in child.content["error"]
    assert content(corrupted, "dataset-size")["failed"] == [
        {"kind": "config-size", "dataset": corrupted_name, "config": "default", "split": None}
    ]
    assert not any(content(corrupted, "dataset-is-valid").values())
    samples.write(mirror / "org" / "notimages" / "train" / "cat" / "1.png", "this is text, not a PNG")
    not_images = run_pipeline("org/notimages")
    assert not_images[("split-first-rows", "default", "train")].error_code == "DatasetGenerationError"
    wide = run_pipeline(samples.wide_dataset(mirror))
    assert (
        wide[("split-first-rows", "default", "train")].http_status,
        wide[("split-first-rows", "default", "train")].error_code,
    ) == (501, "TooManyColumnsError")


def test_a_ten_megabyte_cell_is_truncated_to_fit(mirror: Path, celery_worker: object) -> None:
    entries = run_pipeline(samples.big_cell_dataset(mirror))
    first_rows = content(entries, "split-first-rows", "default", "train")
    assert first_rows["rows"][0]["truncated_cells"] == ["text"]  # cut to WORKER_FIRST_ROWS_MAX_CELL_BYTES
    assert len(first_rows["rows"][0]["row"]["text"]) == get_config().worker.first_rows_max_cell_bytes
    assert first_rows["rows"][1]["row"] == {"id": 2, "text": "small"}


def test_backfill_recomputes_exactly_an_obsolete_step_and_its_descendants(
    mirror: Path, celery_worker: object, default_graph: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = samples.csv_dataset(mirror)
    before = run_pipeline(dataset)
    assert orchestrator.backfill(get_queue(), dataset) == []
    bumped = [
        dataclasses.replace(s, job_runner_version=s.job_runner_version + (s.name == "config-parquet"))
        for s in graph_module.DEFAULT_STEPS
    ]
    monkeypatch.setattr(graph_module, "processing_graph", graph_module.ProcessingGraph(bumped))
    planned = orchestrator.backfill(get_queue(), dataset)
    assert [(job.step, job.config) for job in planned] == [("config-parquet", "default")]
    after = wait_until_settled(dataset)
    changed = sorted({key[0] for key, entry in after.items() if entry.updated_at != before[key].updated_at})
    below = [step.name for step in get_processing_graph().descendants("config-parquet")]
    assert changed == sorted(["config-parquet", *below])
    assert "dataset-configs-settled" in below and "dataset-hub-cache" in below
    assert after[("config-parquet", "default", None)].job_runner_version == 2
    assert orchestrator.backfill(get_queue(), dataset) == []


def test_backfill_enqueues_a_missing_root_and_retries_retryable_errors(
    mirror: Path, celery_worker: object, default_graph: None
) -> None:
    dataset = samples.jsonl_dataset(mirror)
    assert [job.step for job in orchestrator.backfill(get_queue(), dataset)] == ["dataset-config-names"]
    entries = wait_until_settled(dataset)
    revision = entries[("config-info", "default", None)].dataset_git_revision
    crashed = JobManagerCrashedError("the worker died")
    assert orchestrator.backfill(get_queue(), dataset) == []
    get_queue().set_limit("org", 0)  # backfilled jobs wait: this test looks at what backfill plans
    max_failed_runs = get_config().worker.max_failed_runs
    for run in range(1, max_failed_runs + 1):
        cache.upsert_error(
            "config-info",
            dataset,
            crashed,
            config="default",
            job_runner_version=get_processing_graph().get_step("config-info").job_runner_version,
            dataset_git_revision=revision,
        )
        assert cache.get_response("config-info", dataset, "default").failed_runs == run
        # Retried while it failed fewer than WORKER_MAX_FAILED_RUNS times in a row, then left alone.
        expected = ["config-info"] if run < max_failed_runs else []
        assert [job.step for job in orchestrator.backfill(get_queue(), dataset)] == expected
        get_queue().cancel(dataset)


def test_an_asset_path_never_leaves_the_storage_directory() -> None:
    location = CellLocation("org/ds", "abc123", "default", "train", 0, "../../etc", 3)
    assert location.relative_directory().as_posix() == "org/ds/--/abc123/--/default/train/0/column-3"
    with pytest.raises(ValueError):
        CellLocation("org/ds", "../x", "default", "train", 0, "image", 0).relative_directory()


def test_nothing_follows_a_job_whose_entry_is_gone(mirror: Path) -> None:
    """A dataset deleted (or moved) while a job of it ends: its children are not enqueued under the old name."""
    dataset = samples.csv_dataset(mirror)
    key = orchestrator.JobKey("dataset-config-names", dataset, None, None)
    content = {"config_names": [{"dataset": dataset, "config": "default"}]}
    assert orchestrator.after_job(get_queue(), key, content, None, "normal") == []
    assert get_queue().jobs(dataset) == []
    cache.upsert_response("dataset-config-names", dataset, content)
    assert [job.step for job in orchestrator.after_job(get_queue(), key, content, None, "normal")] != []
