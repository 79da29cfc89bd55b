"""The steps the viewer's clients read (issue 25): each derived from entries the pipeline already has, run on
sample datasets through the queue and Celery's in-process worker, their contents checked against the
viewer's OpenAPI document where it has a schema for them (jsonschema), and the graph's plans that make
each of them run once, after all its inputs, even when a config's conversion fails after its first rows."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import cache
from http import HTTPStatus
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from common.cache import CachedResponse, get_response, upsert_response
from common.config import get_config
from common.exceptions import DatasetGenerationError
from common.orchestrator import JobKey, plan_after_failure, plan_after_success
from common.processing_graph import DEFAULT_STEPS, ProcessingGraph
from tasks import samples
from tasks.steps.croissant import crumbs as dataset_crumbs
from tasks.steps.croissant import field_of
from tasks.steps.filetypes import count_filetypes
from tasks.steps.image_urls import is_image_url
from tasks.steps.libraries import main_format
from tasks.steps.modalities import from_features, from_filetypes
from tests.conftest import Stores
from tests.test_pipeline import content, mirror, run_pipeline, use_pipeline_settings  # noqa: F401  (mirror: the fixture)

DOCUMENT = Path(__file__).resolve().parents[2] / "shared" / "reference" / "dataset-viewer-openapi.json"
BASE = "urn:viewer-openapi"
FLAGS = ("preview", "viewer", "search", "filter", "statistics")
GRAPH = ProcessingGraph(DEFAULT_STEPS)
Entries = dict[tuple[str, str | None, str | None], CachedResponse]


@cache
def _registry() -> Registry[Any]:
    document = json.loads(DOCUMENT.read_text())
    return Registry().with_resource(BASE, DRAFT202012.create_resource(document))


def conforms(schema: str, instance: Any) -> None:
    """The instance, as JSON, is valid against the viewer's component schema."""
    validator = jsonschema.Draft202012Validator({"$ref": f"{BASE}#/components/schemas/{schema}"}, registry=_registry())
    errors = [
        f"{list(e.absolute_path)}: {e.message[:200]}" for e in validator.iter_errors(json.loads(json.dumps(instance)))
    ]
    assert errors == [], (schema, errors)


def served_parquet(parquet: dict[str, Any]) -> dict[str, Any]:
    """A dataset-parquet content as the API serves it: each file with its `url` (tasks.api.urls)."""
    files = [{**file, "url": f"http://api.example/parquet-files/{file['path']}"} for file in parquet["parquet_files"]]
    return {**parquet, "parquet_files": files}


def flags(entries: Entries, kind: str, config: str | None = None, split: str | None = None) -> dict[str, bool]:
    found = content(entries, kind, config, split)
    conforms("IsValidResponse", found)
    return {flag: found[flag] for flag in FLAGS}


@pytest.fixture
def small_parquet_mirror(stores: Stores, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "mirror"
    root.mkdir()
    # 600 bytes of Arrow data per split: the Parquet file of a split of 150 rows holds its first rows only.
    use_pipeline_settings(monkeypatch, tmp_path, f"file://{root}", WORKER_PARQUET_MAX_BYTES="600")
    yield root
    get_config.cache_clear()


def mixed_dataset(root: Path, name: str = "org/mixed") -> str:
    """Three configs: `good` (an image URL column; its train split cut at WORKER_PARQUET_MAX_BYTES),
    `broken` (not UTF-8: neither first rows nor Parquet files), `late` (its first rows come from its first
    file; its second file's columns differ, so the conversion fails after the first rows succeeded)."""
    samples.write(
        root / name / "README.md",
        "---\nconfigs:\n"
        "- config_name: good\n  data_files:\n  - split: train\n    path: good/train.csv\n"
        "  - split: test\n    path: good/test.csv\n"
        "- config_name: broken\n  data_files:\n  - split: train\n    path: broken/train.csv\n"
        "- config_name: late\n  data_files:\n  - split: train\n    path: late/*.csv\n---\n# Mixed\n",
    )
    rows = "".join(f"{i},https://img.example/{i}.png?size=2,{i / 2}\n" for i in range(150))
    samples.write(root / name / "good" / "train.csv", "id,url,score\n" + rows)
    samples.write(root / name / "good" / "test.csv", "id,url,score\n1,https://img.example/a.jpg,0.5\n")
    samples.write(root / name / "broken" / "train.csv", b"id,text\n1,\xff\xfe\xfa\n")
    samples.write(root / name / "late" / "a.csv", "id,text\n" + "".join(f"{i},t{i}\n" for i in range(150)))
    samples.write(root / name / "late" / "b.csv", "id,text,extra\nx,y,z\n")
    return name


def test_a_valid_dataset_gets_every_viewer_entry(mirror: Path, celery_worker: object) -> None:  # noqa: F811
    dataset = samples.csv_dataset(mirror)
    entries = run_pipeline(dataset)
    assert all(entry.is_success for entry in entries.values()), [k for k, e in entries.items() if not e.is_success]
    assert len(entries) == 12 + 7 + 5 * 2
    revision = entries[("dataset-config-names", None, None)].dataset_git_revision
    assert {entry.dataset_git_revision for entry in entries.values()} == {revision}
    everything = {"preview": True, "viewer": True, "search": True, "filter": True, "statistics": True}
    assert flags(entries, "dataset-is-valid") == everything
    assert flags(entries, "config-is-valid", "default") == everything
    assert content(entries, "config-is-valid", "default")["splits"] == ["train", "test"]
    assert flags(entries, "split-is-valid", "default", "test") == everything
    # The dataset level of /splits, /parquet and /info: the configs' entries gathered.
    splits = content(entries, "dataset-split-names")
    conforms("SplitsResponse", splits)
    listed = content(entries, "config-split-names", "default")["splits"]
    assert splits == {"splits": listed, "pending": [], "failed": [], "partial": False}
    parquet = content(entries, "dataset-parquet")
    conforms("ParquetResponse", served_parquet(parquet))
    files = content(entries, "config-parquet", "default")["parquet_files"]
    assert parquet == {"parquet_files": files, "pending": [], "failed": [], "partial": False}
    info = content(entries, "dataset-info")
    conforms("InfoResponse", info)
    assert info["dataset_info"] == {"default": content(entries, "config-info", "default")["dataset_info"]}
    assert (info["pending"], info["failed"], info["partial"]) == ([], [], False)
    # What the Hub reads.
    assert content(entries, "split-image-url-columns", "default", "train") == {"columns": []}
    assert content(entries, "dataset-filetypes") == {"filetypes": [{"extension": ".csv", "count": 2}]}
    assert content(entries, "dataset-modalities") == {"modalities": ["tabular", "text"]}
    libraries = content(entries, "dataset-compatible-libraries")
    assert libraries["formats"] == ["csv"]
    by_name = {library["library"]: library for library in libraries["libraries"]}
    assert list(by_name) == ["datasets", "pandas", "polars", "duckdb", "mlcroissant"]
    assert by_name["datasets"]["loading_codes"][0]["code"].endswith('load_dataset("org/csv")')
    (pandas,) = by_name["pandas"]["loading_codes"]
    assert pandas["arguments"] == {"splits": {file["split"]: file["path"] for file in files}}
    assert 'pd.read_parquet("http://localhost:8000/parquet-files/" + splits["train"])' in pandas["code"]
    assert by_name["mlcroissant"]["loading_codes"][0]["arguments"] == {"record_set": "default", "partial": False}
    crumbs = content(entries, "dataset-croissant-crumbs")
    assert crumbs["@type"] == "sc:Dataset" and crumbs["conformsTo"] == "http://mlcommons.org/croissant/1.1"
    splits_set, rows_set = crumbs["recordSet"]
    assert splits_set["data"] == [{"default_splits/split_name": "train"}, {"default_splits/split_name": "test"}]
    types = {field["@id"]: field.get("dataType") for field in rows_set["field"]}
    assert types == {
        "default/split": "sc:Text",
        "default/id": "cr:Int64",
        "default/text": "sc:Text",
        "default/score": "cr:Float64",
        "default/flag": "sc:Boolean",
    }
    assert content(entries, "dataset-hub-cache") == {
        "preview": True,
        "viewer": True,
        "partial": False,
        "num_rows": 152,
        "tags": ["croissant"],
        "libraries": ["datasets", "pandas", "polars", "duckdb", "mlcroissant"],
        "modalities": ["tabular", "text"],
        "formats": ["csv"],
    }


def test_a_failing_config_a_late_failure_and_a_partial_config(
    small_parquet_mirror: Path, celery_worker: object
) -> None:
    dataset = mixed_dataset(small_parquet_mirror)
    entries = run_pipeline(dataset)
    assert entries[("split-first-rows", "broken", "train")].error_code == "DatasetGenerationError"
    assert entries[("config-parquet-and-info", "late", None)].error_code == "DatasetGenerationError"
    assert entries[("split-first-rows", "late", "train")].is_success  # its first file is fine
    assert content(entries, "config-parquet", "good")["partial"] is True
    # Every flag comes from the entries that succeeded; a failed input turns its flag off, never fails.
    nothing = dict.fromkeys(FLAGS, False)
    preview_only = {**nothing, "preview": True}
    everything = dict.fromkeys(FLAGS, True)
    assert flags(entries, "config-is-valid", "good") == everything
    assert flags(entries, "config-is-valid", "broken") == nothing
    assert flags(entries, "config-is-valid", "late") == preview_only  # after its conversion failed
    assert flags(entries, "split-is-valid", "good", "test") == everything
    assert flags(entries, "split-is-valid", "broken", "train") == nothing
    assert flags(entries, "split-is-valid", "late", "train") == preview_only
    assert flags(entries, "dataset-is-valid") == everything
    # Gathered: the failed configs as the viewer's schemas say, and partial.
    splits = content(entries, "dataset-split-names")
    conforms("SplitsResponse", splits)
    assert [(s["config"], s["split"]) for s in splits["splits"]] == [
        ("good", "train"),
        ("good", "test"),
        ("broken", "train"),
        ("late", "train"),
    ]
    parquet = content(entries, "dataset-parquet")
    conforms("ParquetResponse", served_parquet(parquet))
    job = {"dataset": dataset, "split": None, "kind": "config-parquet"}
    assert parquet["failed"] == [{**job, "config": "broken"}, {**job, "config": "late"}]
    assert {f["config"] for f in parquet["parquet_files"]} == {"good"} and parquet["partial"] is True
    info = content(entries, "dataset-info")
    conforms("InfoResponse", info)
    assert list(info["dataset_info"]) == ["good"] and [f["config"] for f in info["failed"]] == ["broken", "late"]
    assert content(entries, "split-image-url-columns", "good", "train") == {"columns": ["url"]}
    assert entries[("split-image-url-columns", "broken", "train")].error_code == "ParentStepFailedError"
    assert "image" in content(entries, "dataset-modalities")["modalities"]
    libraries = content(entries, "dataset-compatible-libraries")
    codes = next(library for library in libraries["libraries"] if library["library"] == "datasets")["loading_codes"]
    assert [code["config_name"] for code in codes] == ["good"]  # the configs with Parquet files
    assert codes[0]["code"].endswith('load_dataset("org/mixed", "good")')
    hub = content(entries, "dataset-hub-cache")
    rows = content(entries, "config-size", "good")["size"]["config"]
    assert hub["partial"] is True and hub["num_rows"] == (rows["estimated_num_rows"] or rows["num_rows"])
    assert (hub["preview"], hub["viewer"], hub["tags"]) == (True, True, ["croissant"])


# --- the plans: each step once, after all its inputs (no server) ---------------------------------


def entry(kind: str, content: dict[str, Any] | None = None, config: str | None = None, split: str | None = None,
          status: int = HTTPStatus.OK) -> CachedResponse:  # fmt: skip
    return CachedResponse(
        kind=kind,
        dataset="org/ds",
        config=config,
        split=split,
        content=content or {},
        http_status=status,
        job_runner_version=GRAPH.get_step(kind).job_runner_version,
        updated_at=datetime.now(UTC),
    )


def test_a_conversion_failing_after_the_first_rows_still_gets_a_config_is_valid() -> None:
    """No config-level job follows a config-level failure: dataset-configs-settled (a dataset-level fan-in
    of everything config-is-valid reads) does, and lists the config for config-is-valid."""
    configs = entry("dataset-config-names", {"config_names": [{"dataset": "org/ds", "config": "a"}]})
    split_names = entry("config-split-names", {"splits": [{"split": "train"}]}, "a")
    first_rows = [entry("split-first-rows", {}, "a", "train"), entry("split-image-url-columns", {}, "a", "train")]
    failed = entry("config-parquet-and-info", {"error": "no"}, "a", status=HTTPStatus.INTERNAL_SERVER_ERROR)
    key = JobKey("config-parquet-and-info", "org/ds", "a", None)
    plan = plan_after_failure(GRAPH, key, DatasetGenerationError("no"), [configs, split_names, *first_rows, failed])
    assert sorted(child.step for child, _ in plan.errors) == [
        "config-info",
        "config-parquet",
        "config-parquet-metadata",
        "config-size",
    ]
    settled = JobKey("dataset-configs-settled", "org/ds", None, None)
    assert settled in plan.jobs  # with the errors above cached, every input of config a is in
    content = {"config_names": [{"dataset": "org/ds", "config": "a"}]}
    after = plan_after_success(GRAPH, settled, content, [configs, entry("dataset-configs-settled", content)])
    assert after.jobs == [JobKey("config-is-valid", "org/ds", "a", None)]


def test_every_new_step_has_one_parent_or_only_finer_ones() -> None:
    """A step whose parents are of its level or coarser is enqueued by each of them: it would run once per
    parent, the first times on incomplete inputs. A fan-in (finer parents only) runs once, when all are in."""
    level = {"dataset": 0, "config": 1, "split": 2}
    for step in GRAPH:
        parents = [GRAPH.get_step(parent) for parent in step.parents]
        coarse = [parent for parent in parents if level[parent.input_type] <= level[step.input_type]]
        assert len(coarse) <= 1 and (not coarse or len(parents) == 1), step.name


# --- what each step reads its answer from (no server) --------------------------------------------


def test_image_urls_filetypes_formats_and_modalities() -> None:
    assert is_image_url("https://img.example/a/cat.PNG?size=2") and is_image_url("http://x.org/a.jpeg")
    assert not is_image_url("https://img.example/page.html") and not is_image_url("file:///a.png")
    assert not is_image_url("cat.png")
    paths = ["README.md", "data/train.csv.gz", "data/test.csv.gz", "x/1.png", "notes.txt_1", "LICENSE"]
    assert count_filetypes(paths) == [
        {"extension": ".csv", "count": 2, "compressed_in": ".gz"},
        {"extension": ".gz", "count": 2},
        {"extension": ".md", "count": 1},
        {"extension": ".png", "count": 1},
        {"extension": ".txt", "count": 1},
    ]
    assert main_format(count_filetypes(paths)) == ["csv"]
    assert main_format([{"extension": ".png", "count": 3}, {"extension": ".md", "count": 1}]) == ["imagefolder"]
    images = {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": ["a"]}}
    assert from_features(images) == {"image"}
    series = [{"name": "values", "type": {"_type": "List", "feature": {"_type": "Value", "dtype": "float32"}}}]
    assert from_features(series) == {"timeseries"}
    numbers = {"a": {"_type": "Value", "dtype": "int64"}, "b": {"_type": "Value", "dtype": "float32"}}
    assert from_features(numbers) == {"tabular"}
    # A README's figures are no dataset of images beside files of rows; 10 of them are.
    assert from_filetypes([{"extension": ".csv", "count": 2}, {"extension": ".png", "count": 3}]) == set()
    assert from_filetypes([{"extension": ".csv", "count": 2}, {"extension": ".png", "count": 12}]) == {"image"}
    assert from_filetypes([{"extension": ".wav", "count": 5}, {"extension": ".md", "count": 1}]) == {"audio"}


def test_croissant_fields_of_nested_features() -> None:
    ids: set[str] = set()
    struct = {"a": {"_type": "Value", "dtype": "int32"}, "b": {"_type": "Image"}, "c": {"_type": "Unknown"}}
    field = field_of("files", "rows/s", "s", struct, ids)
    assert field is not None and [sub["@id"] for sub in field["subField"]] == ["rows/s/a", "rows/s/b"]
    assert field["subField"][0]["source"]["transform"] == {"jsonPath": "a"}
    assert field["subField"][1]["source"]["transform"] == [{"jsonPath": "b"}, {"jsonPath": "bytes"}]
    listed = field_of("files", "rows/l", "l", {"_type": "List", "feature": {"_type": "Value", "dtype": "string"}}, ids)
    assert listed is not None and listed["isArray"] is True and listed["dataType"] == "sc:Text"
    assert field_of("files", "rows/x", "x", {"_type": "Array2D", "shape": [2, 2]}, ids) is None


def test_croissant_crumbs_of_a_config_named_with_dots_are_stored(stores: Stores) -> None:
    """Croissant ids keep `.` (a config `v1.0`): the cache stores keys holding one, and reads them back."""
    features = {"x": {"_type": "Value", "dtype": "int64"}}
    info = {"config_name": "v1.0", "features": features, "splits": {"train.a": {}}}
    crumbs = dataset_crumbs("org/dots", [info], partial=False, more_configs=False)
    assert crumbs["recordSet"][0]["data"] == [{"v1.0_splits/split_name": "train.a"}]
    upsert_response("dataset-croissant-crumbs", "org/dots", crumbs)
    assert get_response("dataset-croissant-crumbs", "org/dots").content == crumbs
