"""Dataset repositories in every format and layout the steps must read, written by the tests.

Each writer lays out `root/<name>/` as a Hub dataset repository and returns the name; :data:`EXPECTED`
says what `datasets` must find in it: configs, splits, the first row of the first split, and its
column types.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.samples import _png, _wav, write

ROWS = [{"id": i, "text": f"row {i}", "score": i / 2} for i in range(30)]


def _csv(rows: list[dict[str, Any]], delimiter: str = ",") -> str:
    output = io.StringIO()
    writer = csv.DictWriter(output, fieldnames=list(rows[0]), delimiter=delimiter, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return output.getvalue()


def csv_repo(root: Path, name: str = "fmt/csv") -> str:
    write(root / name / "data" / "train.csv", _csv(ROWS))
    write(root / name / "data" / "test.csv", _csv(ROWS[:3]))
    return name


def tsv_repo(root: Path, name: str = "fmt/tsv") -> str:
    write(root / name / "train.tsv", _csv(ROWS, delimiter="\t"))
    return name


def jsonl_repo(root: Path, name: str = "fmt/jsonl") -> str:
    write(root / name / "train.jsonl", "".join(json.dumps(row) + "\n" for row in ROWS))
    return name


def parquet_repo(root: Path, name: str = "fmt/parquet") -> str:
    path = root / name / "data" / "train-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    return name


def arrow_repo(root: Path, name: str = "fmt/arrow") -> str:
    path = root / name / "train.arrow"
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(ROWS)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return name


def gzipped_csv_repo(root: Path, name: str = "fmt/gzcsv") -> str:
    write(root / name / "train.csv.gz", gzip.compress(_csv(ROWS).encode()))
    return name


def sharded_repo(root: Path, name: str = "fmt/sharded") -> str:
    for shard in range(3):
        rows = ROWS[shard * 10 : (shard + 1) * 10]
        write(root / name / "data" / f"train-0000{shard}-of-00003.csv", _csv(rows))
    return name


def imagefolder_repo(root: Path, name: str = "fmt/images") -> str:
    for index, (label, color) in enumerate((("cat", (255, 0, 0)), ("dog", (0, 255, 0)), ("dog", (0, 0, 255)))):
        write(root / name / "train" / label / f"{index}.png", _png(color))
    return name


def audio_column_repo(root: Path, name: str = "fmt/audio") -> str:
    """A Parquet file whose `audio` column is an Audio feature (the metadata `datasets` writes)."""
    features = {"audio": {"_type": "Audio"}, "text": {"dtype": "string", "_type": "Value"}}
    schema = pa.schema(
        [("audio", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("text", pa.string())],
        metadata={"huggingface": json.dumps({"info": {"features": features}})},
    )
    rows = [{"audio": {"bytes": _wav(440 * (i + 1)), "path": f"{i}.wav"}, "text": f"say {i}"} for i in range(2)]
    path = root / name / "train.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return name


def two_configs_repo(root: Path, name: str = "fmt/configs") -> str:
    write(
        root / name / "README.md",
        "---\nconfigs:\n- config_name: en\n  data_files:\n  - split: train\n    path: english/*.csv\n"
        "- config_name: fr\n  data_dir: french\n---\n# Two configs\n",
    )
    write(root / name / "english" / "a.csv", "word\nhello\nworld\n")
    write(root / name / "french" / "train.csv", "word\nbonjour\n")
    write(root / name / "french" / "test.csv", "word\nmonde\n")
    return name


NUMBERS = {"id": "int64", "text": "string", "score": "float64"}
EXPECTED: dict[str, tuple[Any, dict[str, list[str]], dict[str, Any], dict[str, Any]]] = {
    # writer: configs -> splits, first row of the first split, column -> type
    "csv": (csv_repo, {"default": ["train", "test"]}, ROWS[0], NUMBERS),
    "tsv": (tsv_repo, {"default": ["train"]}, ROWS[0], NUMBERS),
    "jsonl": (jsonl_repo, {"default": ["train"]}, ROWS[0], NUMBERS),
    "parquet": (parquet_repo, {"default": ["train"]}, ROWS[0], NUMBERS),
    "arrow": (arrow_repo, {"default": ["train"]}, ROWS[0], NUMBERS),
    "gzipped csv": (gzipped_csv_repo, {"default": ["train"]}, ROWS[0], NUMBERS),
    "sharded": (sharded_repo, {"default": ["train"]}, ROWS[0], NUMBERS),
    "image folder": (
        imagefolder_repo,
        {"default": ["train"]},
        {"label": 0},
        {"image": "Image", "label": "ClassLabel"},
    ),
    "audio column": (
        audio_column_repo,
        {"default": ["train"]},
        {"text": "say 0"},
        {"audio": "Audio", "text": "string"},
    ),
    "two configs": (
        two_configs_repo,
        {"en": ["train"], "fr": ["train", "test"]},
        {"word": "hello"},
        {"word": "string"},
    ),
}
