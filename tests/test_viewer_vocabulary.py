"""The cached contents speak the dataset viewer's vocabulary: each step's content validates against the
matching component schema of the viewer's published OpenAPI document, `/info`'s `dataset_info` is a
`datasets.DatasetInfo` that `DatasetInfo.from_dict` reads back, `/size` has the viewer's sizes and
estimates, `/statistics` the viewer's column types, and first rows' Audio features a sampling rate.

The document (huggingface/dataset-viewer's `docs/source/openapi.json`) is read as JSON Schema 2020-12, its
`$ref`s resolved against the whole document, with three readings of what its schemas write loosely:

1. `nullable: true` (OpenAPI 3.0's keyword, which 2020-12 ignores) also allows null: ValueCell uses it;
2. `oneOf` is read as `anyOf`: the document means a union, and its branches overlap (an integer is both
   the `integer` and the `number` branch of ValueCell, and a ValueCell and a ClassLabelCell of Cell), so
   read as exclusive `oneOf` no integer cell would validate;
3. ValueFeature's `dtype` enum lists descriptions (`float32 (alias float)`, `timestamp[(s|ms|us|ns)]`),
   read as the names they describe (`float32`, `float`, `timestamp[us]`...), else no float64 or timestamp
   column of any dataset would validate.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import wave
from collections.abc import Callable
from datetime import datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from common import cache as responses
from common.config import get_config
from common.processing_graph import get_processing_graph
from common.progress import Progress
from common.sources import get_source
from common.tables import AudioHeader, audio_header
from tasks import samples
from tasks.step_task import StepJob
from tasks.steps import parquet, statistics
from tests import formats
from tests.conftest import Stores, use_settings
from tests.test_pipeline import content, mirror, run_pipeline, use_pipeline_settings  # noqa: F401  (mirror: the fixture)

DOCUMENT = Path(
    os.environ.get(
        "VIEWER_OPENAPI_DOCUMENT",
        Path(__file__).resolve().parents[2] / "shared" / "reference" / "dataset-viewer-openapi.json",
    )
)
BASE = "urn:viewer-openapi"
SCHEMAS = {  # the step -> the viewer's schema of its content
    "split-first-rows": "FirstRowsResponse",
    "config-info": "InfoResponse",
    "config-size": "ConfigSizeResponse",
    "dataset-size": "DatasetSizeResponse",
    "split-descriptive-statistics": "StatisticsResponse",
}
COLUMN_TYPES = {"int", "float", "class_label", "string_label", "string_text", "bool", "list", "image", "audio"}


def _names_pattern(members: list[str]) -> str:
    """Reading 3: the names an enum of descriptions allows, as a regular expression."""
    names = []
    for member in members:
        alias = re.fullmatch(r"(\S+) \(alias (\S+)\)", member)
        if alias:
            names += [re.escape(name) for name in alias.groups()]
            continue
        pattern = re.escape(member)
        pattern = pattern.replace(re.escape("(tzstring)"), r"[^\]]+")
        pattern = pattern.replace(re.escape("(precision, scale)"), r"\(\d+, ?-?\d+\)")
        pattern = re.sub(r"\\\(([a-z|\\]+)\\\)", lambda m: "(?:" + m.group(1).replace("\\|", "|") + ")", pattern)
        names.append(pattern)
    return "^(?:" + "|".join(names) + ")$"


def _read(node: Any) -> Any:
    """The schemas under `node`, with the module docstring's three readings."""
    if isinstance(node, list):
        return [_read(item) for item in node]
    if not isinstance(node, dict):
        return node
    read = {key: _read(value) for key, value in node.items()}
    if isinstance(read.get("oneOf"), list) and "anyOf" not in read:
        read["anyOf"] = read.pop("oneOf")
    members = read.get("enum")
    if isinstance(members, list) and any(isinstance(m, str) and re.search(r"[\s(\[]", m) for m in members):
        read["pattern"] = _names_pattern(read.pop("enum"))
    if read.get("nullable") is True:
        del read["nullable"]
        return {"anyOf": [read, {"type": "null"}]}
    return read


@cache
def _registry() -> Registry[Any]:
    document = json.loads(DOCUMENT.read_text())
    document["components"]["schemas"] = _read(document["components"]["schemas"])
    return Registry().with_resource(BASE, DRAFT202012.create_resource(document))


def violations(schema: str, instance: Any) -> list[str]:
    """How the instance departs from the document's component schema (none: it conforms)."""
    validator = jsonschema.Draft202012Validator({"$ref": f"{BASE}#/components/schemas/{schema}"}, registry=_registry())
    served = orjson.loads(orjson.dumps(instance, default=str))  # as the API serves it (dates as text)
    return [f"{list(error.absolute_path)}: {error.message[:300]}" for error in validator.iter_errors(served)]


def check_info_round_trips(info: dict[str, Any]) -> None:
    """`datasets.DatasetInfo.from_dict` reads the dict back, features, splits and sizes alike."""
    from datasets import DatasetInfo, Features

    read = DatasetInfo.from_dict(info)
    assert read.features == Features.from_dict(info["features"])
    assert read.features is not None and read.features.to_dict() == info["features"]
    assert read.splits is not None and {name: split.num_examples for name, split in read.splits.items()} == {
        name: split["num_examples"] for name, split in info["splits"].items()
    }
    assert (read.builder_name, read.config_name, read.dataset_name) == (
        info["builder_name"],
        info["config_name"],
        info["dataset_name"],
    )
    assert (str(read.version), read.download_size, read.dataset_size) == (
        info["version"]["version_str"],
        info["download_size"],
        info["dataset_size"],
    )


def columns_repo(root: Path, name: str = "fmt/columns") -> str:
    """A Parquet file with a column of each kind the statistics describe."""
    start = datetime(2024, 1, 1)
    table = pa.table(
        {
            "id": pa.array(range(100), pa.int32()),
            "animal": [["cat", "dog", "bird"][i % 3] if i % 10 else None for i in range(100)],
            "note": [f"note number {i}" for i in range(100)],
            "ok": [i % 4 == 0 if i % 7 else None for i in range(100)],
            "tags": [list(range(i % 4)) for i in range(100)],
            "when": pa.array([start + timedelta(hours=i) for i in range(100)], pa.timestamp("s")),
            "meta": [{"a": i} for i in range(100)],  # a struct: not described
        }
    )
    path = root / name / "data" / "train-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return name


def _statistics(entries: dict[Any, Any], config: str = "default", split: str = "train") -> dict[str, Any]:
    found = content(entries, "split-descriptive-statistics", config, split)["statistics"]
    return {column["column_name"]: column for column in found}


def _first_rows_types(entries: dict[Any, Any], config: str = "default", split: str = "train") -> dict[str, Any]:
    return {f["name"]: f["type"] for f in content(entries, "split-first-rows", config, split)["features"]}


def _csv(entries: dict[Any, Any], root: Path, dataset: str) -> None:
    info = content(entries, "config-info", "default")["dataset_info"]
    assert info["features"] == {
        "id": {"dtype": "int64", "_type": "Value"},
        "text": {"dtype": "string", "_type": "Value"},
        "score": {"dtype": "float64", "_type": "Value"},
        "flag": {"dtype": "bool", "_type": "Value"},
    }
    assert (info["builder_name"], info["config_name"], info["dataset_name"]) == ("csv", "default", "csv")
    assert info["version"] == {"version_str": "0.0.0", "major": 0, "minor": 0, "patch": 0}
    assert info["splits"]["train"] == {
        "name": "train",
        "num_bytes": info["splits"]["train"]["num_bytes"],
        "num_examples": 150,
        "dataset_name": "csv",
    }
    originals = {split: (root / dataset / f"{split}.csv").stat().st_size for split in ("train", "test")}
    assert info["download_size"] == sum(originals.values())
    assert info["dataset_size"] == sum(split["num_bytes"] for split in info["splits"].values()) > 0
    size = content(entries, "config-size", "default")["size"]
    assert {s["split"]: (s["num_bytes_original_files"], s["estimated_num_rows"]) for s in size["splits"]} == {
        "train": (originals["train"], 150),
        "test": (originals["test"], 2),
    }
    assert size["config"]["num_bytes_original_files"] == sum(originals.values())
    assert (size["config"]["estimated_num_rows"], size["config"]["num_columns"]) == (152, 4)
    total = content(entries, "dataset-size")
    assert total["size"]["dataset"] == {
        "dataset": dataset,
        "num_bytes_original_files": sum(originals.values()),
        "num_bytes_parquet_files": size["config"]["num_bytes_parquet_files"],
        "num_bytes_memory": size["config"]["num_bytes_memory"],
        "num_rows": 152,
        "estimated_num_rows": 152,
    }
    assert (total["pending"], total["failed"], total["partial"]) == ([], [], False)
    described = _statistics(entries)
    assert {name: column["column_type"] for name, column in described.items()} == {
        "id": "int",
        "score": "float",
        "text": "string_text",  # 150 distinct values in 150 rows
        "flag": "bool",
    }
    assert list(described) == sorted(described)  # in the order of their names, as the viewer lists them
    assert described["flag"]["column_statistics"]["frequencies"] == {"False": 75, "True": 75}
    assert described["id"]["column_statistics"]["histogram"] == {
        "hist": [15] * 10,
        "bin_edges": [0, 15, 30, 45, 60, 75, 90, 105, 120, 135, 149],  # integer bins of ceil(150 / 10)
    }
    assert described["text"]["column_statistics"]["min"] == len("row 0")


def _columns(entries: dict[Any, Any], root: Path, dataset: str) -> None:
    described = _statistics(entries)
    assert {name: column["column_type"] for name, column in described.items()} == {
        "id": "int",
        "animal": "string_label",  # 3 values and null among 100 rows
        "note": "string_text",
        "ok": "bool",
        "tags": "list",
        "when": "datetime",
    }
    animal = described["animal"]["column_statistics"]
    assert animal == {
        "nan_count": 10,
        "nan_proportion": 0.1,
        "no_label_count": 0,
        "no_label_proportion": 0.0,
        "n_unique": 3,
        "frequencies": {"bird": 30, "cat": 30, "dog": 30},
    }
    assert described["ok"]["column_statistics"]["frequencies"] == {"False": 64, "True": 21}
    tags = described["tags"]["column_statistics"]
    assert (tags["min"], tags["max"], tags["mean"], tags["histogram"]["hist"]) == (0, 3, 1.5, [25, 25, 50])
    when = described["when"]["column_statistics"]
    assert (when["min"], when["max"]) == ("2024-01-01 00:00:00", "2024-01-05 03:00:00")
    assert len(when["histogram"]["bin_edges"]) == 11 and sum(when["histogram"]["hist"]) == 100
    info = content(entries, "config-info", "default")["dataset_info"]
    assert info["features"]["tags"] == {"feature": {"dtype": "int64", "_type": "Value"}, "_type": "List"}
    assert info["features"]["when"] == {"dtype": "timestamp[ms]", "_type": "Value"}  # Parquet has no seconds


def _images(entries: dict[Any, Any], root: Path, dataset: str) -> None:
    assert content(entries, "config-info", "default")["dataset_info"]["features"] == {
        "image": {"_type": "Image"},
        "label": {"names": ["cat", "dog"], "_type": "ClassLabel"},
    }
    described = _statistics(entries)
    assert described["image"]["column_type"] == "image"
    widths = described["image"]["column_statistics"]
    assert (widths["min"], widths["max"], widths["histogram"]) == (8, 8, {"hist": [3], "bin_edges": [8, 8]})
    labels = described["label"]["column_statistics"]
    assert (labels["n_unique"], labels["frequencies"], labels["no_label_count"]) == (2, {"cat": 1, "dog": 2}, 0)


def _audio(entries: dict[Any, Any], root: Path, dataset: str) -> None:
    assert _first_rows_types(entries)["audio"] == {"sampling_rate": 8000, "_type": "Audio"}
    assert content(entries, "config-info", "default")["dataset_info"]["features"]["audio"] == {"_type": "Audio"}
    durations = _statistics(entries)["audio"]
    assert durations["column_type"] == "audio"
    assert (durations["column_statistics"]["min"], durations["column_statistics"]["max"]) == (0.1, 0.1)


def _two_configs(entries: dict[Any, Any], root: Path, dataset: str) -> None:
    total = content(entries, "dataset-size")["size"]
    assert [c["config"] for c in total["configs"]] == ["en", "fr"]
    assert total["dataset"]["num_rows"] == total["dataset"]["estimated_num_rows"] == 4
    assert total["dataset"]["num_bytes_original_files"] == sum(
        path.stat().st_size for path in (root / dataset).rglob("*.csv")
    )
    for config, splits in (("en", ["train"]), ("fr", ["train", "test"])):
        info = content(entries, "config-info", config)["dataset_info"]
        assert info["config_name"] == config and list(info["splits"]) == splits
    # Few distinct strings: a label, as the viewer tells them.
    assert _statistics(entries, "en")["word"]["column_type"] == "string_label"


DATASETS: dict[str, tuple[Callable[[Path], str], Callable[[dict[Any, Any], Path, str], None]]] = {
    "csv": (samples.csv_dataset, _csv),
    "columns": (columns_repo, _columns),
    "images": (samples.image_dataset, _images),
    "audio folder": (samples.audio_dataset, _audio),
    "audio column": (formats.audio_column_repo, _audio),
    "two configs": (formats.two_configs_repo, _two_configs),
}


@pytest.mark.parametrize("kind", list(DATASETS))
def test_every_content_validates_against_the_viewers_schema(kind: str, mirror: Path, celery_worker: object) -> None:  # noqa: F811
    write, check = DATASETS[kind]
    dataset = write(mirror)
    entries = run_pipeline(dataset)
    checked = []
    for (step, config, split), entry in entries.items():
        if step not in SCHEMAS:
            continue
        assert entry.is_success, (step, config, split, entry.error_code, entry.content)
        assert violations(SCHEMAS[step], entry.content) == [], (step, config, split)
        checked.append(step)
        if step == "split-descriptive-statistics":
            assert {column["column_type"] for column in entry.content["statistics"]} <= COLUMN_TYPES | {"datetime"}
        if step == "config-info":
            check_info_round_trips(entry.content["dataset_info"])
            parent = content(entries, "config-parquet-and-info", config)
            assert parent["dataset_info"] == entry.content["dataset_info"]
    assert set(checked) == set(SCHEMAS)
    check(entries, mirror, dataset)


def test_a_cut_conversion_is_partial_and_estimates_its_rows_at_every_level(
    stores: Stores, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, celery_worker: object
) -> None:
    root = tmp_path / "mirror"
    use_pipeline_settings(monkeypatch, tmp_path, f"file://{root}", WORKER_PARQUET_MAX_BYTES="2000")
    dataset = samples.csv_dataset(root)
    try:
        entries = run_pipeline(dataset)
    finally:
        get_config.cache_clear()
    for (step, config, split), entry in entries.items():
        if step in SCHEMAS:
            assert violations(SCHEMAS[step], entry.content) == [], (step, config, split)
    parent = content(entries, "config-parquet-and-info", "default")
    assert parent["conversion"]["train"]["partial"] is True and parent["conversion"]["test"]["partial"] is False
    check_info_round_trips(content(entries, "config-info", "default")["dataset_info"])
    size = content(entries, "config-size", "default")
    train, test = size["size"]["splits"]
    assert train["partial"] is True and train["num_rows"] < 150 and train["estimated_num_rows"] >= train["num_rows"]
    assert (test["partial"], test["estimated_num_rows"]) == (False, 2)
    assert size["partial"] is True
    assert size["size"]["config"]["estimated_num_rows"] == train["estimated_num_rows"] + 2
    total = content(entries, "dataset-size")
    assert total["partial"] is True
    assert total["size"]["dataset"]["estimated_num_rows"] == size["size"]["config"]["estimated_num_rows"]
    assert content(entries, "config-info", "default")["partial"] is True


def test_a_failed_config_is_a_failed_job_of_the_dataset_size(mirror: Path, celery_worker: object) -> None:  # noqa: F811
    dataset = samples.corrupted_dataset(mirror)
    total = content(run_pipeline(dataset), "dataset-size")
    assert violations("DatasetSizeResponse", total) == []
    assert total["failed"] == [{"kind": "config-size", "dataset": dataset, "config": "default", "split": None}]
    assert (total["pending"], total["partial"], total["size"]["configs"]) == ([], True, [])
    assert total["size"]["dataset"]["estimated_num_rows"] is None  # no config says


def _convert(dataset: str) -> dict[str, Any]:
    """config-parquet-and-info's content, computed in this thread (nothing else reads meanwhile)."""
    job = StepJob(None, "config-parquet-and-info", dataset, "default", None, Progress(lambda message: None))
    job.known_revision = get_source().revision(dataset)
    return dict(parquet.config_parquet_and_info(job))


def test_a_cut_split_is_estimated_from_its_card_or_else_from_the_bytes_read(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    root = tmp_path / "mirror"
    use_settings(
        monkeypatch,
        {
            "COMMON_HF_ENDPOINT": f"file://{root}",
            "COMMON_HF_CACHE_DIRECTORY": str(tmp_path / "hf-cache"),
            "WORKER_PARQUET_DIRECTORY": str(tmp_path / "parquet"),
            "WORKER_PARQUET_MAX_BYTES": str(2_000_000),
        },
    )
    rows = 400_000  # about 10 MB of CSV: the first fifth converted
    samples.write(root / "big" / "csv" / "train.csv", "id,text\n" + "".join(f"{i},text {i:08d}\n" for i in range(rows)))
    card = "---\ndataset_info:\n  splits:\n  - name: train\n    num_examples: 400000\n---\n"
    samples.write(root / "big" / "carded" / "README.md", card)
    samples.write(root / "big" / "carded" / "train.csv", (root / "big" / "csv" / "train.csv").read_text())
    measured = _convert("big/csv")
    converted, original = measured["dataset_info"]["splits"]["train"], measured["conversion"]["train"]
    assert original["partial"] is True and converted["num_examples"] < rows / 2
    assert original["num_bytes_original_files"] == (root / "big" / "csv" / "train.csv").stat().st_size
    # The rows converted times the file's bytes over the bytes read (the reader reads ahead: an underestimate)
    print(converted["num_examples"], original["estimated_num_rows"])
    assert rows / 2 < original["estimated_num_rows"] <= rows * 1.2
    assert _convert("big/carded")["conversion"]["train"]["estimated_num_rows"] == rows  # the card says
    assert parquet.estimated_num_rows(10, False, None, None, None) == 10  # converted whole: its rows
    assert parquet.estimated_num_rows(10, True, None, None, None) is None  # nothing tells
    get_config.cache_clear()


def _described(tmp_path: Path, columns: dict[str, Any]) -> dict[str, dict[str, Any]]:
    path = tmp_path / "described.parquet"
    pq.write_table(pa.table(columns), path)
    found = statistics.describe(str(path), Progress(lambda message: None))["statistics"]
    return {column["column_name"]: column for column in found}


@pytest.mark.parametrize(
    ("values", "column_type"),
    [
        ([f"v{i % 10}" for i in range(20)], "string_label"),  # at most 10 distinct values, whatever the rows
        ([f"v{i % 11}" for i in range(20)], "string_text"),
        ([f"v{i % 20}" for i in range(100)], "string_label"),  # at most a fifth of the rows
        ([f"v{i % 21}" for i in range(100)], "string_text"),
        ([f"v{i % 9}" if i % 10 else None for i in range(11)], "string_label"),  # null counts as a value
        ([f"v{i % 10}" if i % 11 else None for i in range(12)], "string_text"),
        ([None, None], "string_label"),
    ],
)
def test_a_string_column_is_a_label_as_the_viewer_tells_them(
    values: list[str | None], column_type: str, tmp_path: Path
) -> None:
    path = tmp_path / "strings.parquet"
    pq.write_table(pa.table({"s": pa.array(values, pa.string())}), path)
    (described,) = statistics.describe(str(path), Progress(lambda message: None))["statistics"]
    assert described["column_type"] == column_type
    assert violations("StatisticsPerColumnItem", described) == []
    found = described["column_statistics"]
    if column_type == "string_label":
        assert found["frequencies"] == {value: values.count(value) for value in set(values) if value is not None}
        assert found["n_unique"] == len(found["frequencies"]) and found["nan_count"] == values.count(None)
    else:  # the statistics of the lengths
        lengths = [len(value) for value in values if value is not None]
        assert (found["min"], found["max"]) == (min(lengths), max(lengths))
        assert sum(found["histogram"]["hist"]) == len(lengths)


def test_memory_stays_bounded_the_labels_counted_and_the_widths_kept_are_capped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(statistics, "MAX_NUM_STRING_LABELS", 5)
    column = statistics.Column("word", "string")
    column.add(pa.array(["a", "b", "c", "a"]))
    assert column.frequencies == {"a": 2, "b": 1, "c": 1}
    column.add(pa.array(["d", "e", "f"]))  # a sixth distinct value: no label, the values are dropped
    assert column.frequencies is None and not column.is_label()
    column.add(pa.array(["g"]))
    assert column.frequencies is None and column.moments.count == 8  # its lengths are still counted
    # Image widths are read once: past KEEP_MAX_VALUES, to a temporary file the later passes read.
    monkeypatch.setattr(statistics, "KEEP_MAX_VALUES", 1)
    monkeypatch.setattr(statistics, "BATCH_ROWS", 7)
    features = {"image": {"_type": "Image"}}
    schema = pa.schema(
        [("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("word", pa.string())],
        metadata={"huggingface": json.dumps({"info": {"features": features}})},
    )
    sizes = [(8 + i % 3, 6) for i in range(30)] + [(1, 1)]
    rows = [{"image": {"bytes": _png(size), "path": None}, "word": f"w{i}"} for i, size in enumerate(sizes)]
    rows.append({"image": {"bytes": b"not an image", "path": None}, "word": None})
    rows.append({"image": None, "word": None})
    path = tmp_path / "images.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema), path)
    found = {c["column_name"]: c for c in statistics.describe(str(path), Progress(lambda m: None))["statistics"]}
    assert found["word"]["column_type"] == "string_text"
    widths = found["image"]["column_statistics"]
    assert found["image"]["column_type"] == "image"
    assert (widths["nan_count"], widths["min"], widths["max"], widths["median"]) == (2, 1, 10, 9.0)
    assert widths["histogram"] == {"hist": [1, 0, 0, 0, 0, 0, 0, 10, 20], "bin_edges": list(range(1, 11))}


def _png(size: tuple[int, int]) -> bytes:
    from PIL import Image

    output = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(output, format="PNG")
    return output.getvalue()


def _wav(rate: int, frames: int) -> bytes:
    output = io.BytesIO()
    with wave.open(output, "wb") as audio:
        audio.setnchannels(1)
        audio.setsampwidth(2)
        audio.setframerate(rate)
        audio.writeframes(b"\0\0" * frames)
    return output.getvalue()


def test_audio_headers_give_the_sampling_rate_and_the_duration() -> None:
    assert audio_header(_wav(16_000, 8_000)) == AudioHeader(16_000, 0.5)
    streaminfo = (44_100 << 44 | 1 << 41 | 15 << 36 | 88_200).to_bytes(8, "big")  # 2 s at 44.1 kHz, 16-bit stereo
    flac = b"fLaC" + bytes([0x80, 0, 0, 34]) + b"\0" * 10 + streaminfo + b"\0" * 16
    assert audio_header(flac) == AudioHeader(44_100, 2.0)
    mp3 = struct.pack(">I", 0xFFFB9000) + b"\0" * (16_000 - 4)  # MPEG-1 layer III, 128 kbit/s, 44.1 kHz: 1 s
    assert audio_header(mp3) == AudioHeader(44_100, pytest.approx(1.0))
    assert audio_header(b"not audio at all") == audio_header(b"RIFF") == AudioHeader()  # nothing known, no error


def test_the_step_versions_went_up_so_a_backfill_recomputes_them() -> None:
    graph = get_processing_graph()
    for step in [*SCHEMAS, "config-parquet-and-info"]:
        assert graph.get_step(step).job_runner_version >= 2, step


def test_a_content_of_before_is_still_read(stores: Stores) -> None:
    """config-size reads a config-parquet-and-info entry written before `conversion` (its splits said)."""
    dataset = "org/old"
    old = {
        "parquet_files": [{"dataset": dataset, "config": "default", "split": "train", "size": 10}],
        "dataset_info": {
            "config_name": "default",
            "features": [{"feature_idx": 0, "name": "x", "type": {"dtype": "int64", "_type": "Value"}}],
            "splits": {"train": {"name": "train", "num_examples": 3, "num_bytes": 24, "partial": True}},
            "download_size": 10,
            "dataset_size": 24,
        },
        "partial": True,
    }
    responses.upsert_response("config-parquet-and-info", dataset, old, config="default", dataset_git_revision="ab")
    job = StepJob(None, "config-size", dataset, "default", None, Progress(lambda message: None))
    size = parquet.config_size(job)
    assert violations("ConfigSizeResponse", size) == []
    assert size["size"]["splits"][0]["estimated_num_rows"] is None and size["partial"] is True
    assert "num_bytes_original_files" not in size["size"]["config"]  # its download_size was the Parquet files'
