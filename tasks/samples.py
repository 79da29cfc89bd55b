"""Small sample datasets written to disk, laid out like Hub dataset repositories (nothing downloads).

`make run` mirrors a few of them (DEMO_DATASETS) for its demo; the tests use all of them, including the
broken ones.
"""

from __future__ import annotations

import io
import json
import math
import struct
import wave
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    return path


def csv_dataset(root: Path, name: str = "org/csv") -> str:
    write(
        root / name / "train.csv",
        "id,text,score,flag\n" + "".join(f"{i},row {i},{i * 0.5},{i % 2 == 0}\n" for i in range(150)),
    )
    write(root / name / "test.csv", "id,text,score,flag\n1,hello,1.5,true\n2,,2.5,false\n")
    return name


def jsonl_dataset(root: Path, name: str = "org/jsonl") -> str:
    for split, count in (("train", 5), ("test", 3)):
        lines = "".join(json.dumps({"question": f"q{i}?", "answer": i}) + "\n" for i in range(count))
        write(root / name / split / "0.jsonl", lines)
    return name


def parquet_dataset(root: Path, name: str = "org/parquet") -> str:
    path = root / name / "data" / "train-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"x": list(range(20)), "y": [f"s{i}" for i in range(20)]}), path)
    return name


def multi_config_dataset(root: Path, name: str = "org/multi") -> str:
    write(
        root / name / "README.md",
        "---\nconfigs:\n- config_name: en\n  data_files:\n  - split: train\n    path: data/en/*.csv\n"
        "- config_name: fr\n  data_files:\n  - split: train\n    path: data/fr/train.csv\n"
        "  - split: test\n    path: data/fr/test.csv\n---\n# Multi\n",
    )
    write(root / name / "data" / "en" / "a.csv", "word\nhello\nworld\n")
    write(root / name / "data" / "fr" / "train.csv", "word\nbonjour\n")
    write(root / name / "data" / "fr" / "test.csv", "word\nmonde\n")
    return name


def _png(color: tuple[int, int, int]) -> bytes:
    output = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(output, format="PNG")
    return output.getvalue()


def image_dataset(root: Path, name: str = "org/images") -> str:
    write(root / name / "train" / "cat" / "1.png", _png((255, 0, 0)))
    write(root / name / "train" / "dog" / "2.png", _png((0, 255, 0)))
    write(root / name / "train" / "dog" / "3.png", _png((0, 0, 255)))
    return name


def _wav(frequency: float) -> bytes:
    output = io.BytesIO()
    with wave.open(output, "wb") as audio:
        audio.setnchannels(1)
        audio.setsampwidth(2)
        audio.setframerate(8000)
        audio.writeframes(b"".join(struct.pack("<h", int(1000 * math.sin(i * frequency / 8000))) for i in range(800)))
    return output.getvalue()


def audio_dataset(root: Path, name: str = "org/audio") -> str:
    write(root / name / "train" / "yes" / "a.wav", _wav(440))
    write(root / name / "train" / "no" / "b.wav", _wav(880))
    return name


def empty_dataset(root: Path, name: str = "org/empty") -> str:
    write(root / name / "README.md", "# Nothing here\n")
    return name


def corrupted_dataset(root: Path, name: str = "org/corrupted") -> str:
    write(root / name / "train.parquet", b"PAR1 this is not a parquet file")
    return name


def big_cell_dataset(root: Path, name: str = "org/bigcell") -> str:
    write(root / name / "train.csv", "id,text\n1," + "x" * 10_000_000 + "\n2,small\n")
    return name


def wide_dataset(root: Path, name: str = "org/wide", columns: int = 2000) -> str:
    header = ",".join(f"c{i}" for i in range(columns))
    write(root / name / "train.csv", header + "\n" + ",".join("1" for _ in range(columns)) + "\n")
    return name


DEMO_DATASETS = {
    "demo/csv": csv_dataset,
    "demo/jsonl": jsonl_dataset,
    "other/parquet": parquet_dataset,
    "other/images": image_dataset,
}


def write_demo_mirror(root: Path) -> list[str]:
    """Write the demo datasets (two namespaces: CSV, JSON Lines, Parquet, an image folder) under root."""
    for name, make in DEMO_DATASETS.items():
        if not (root / name).exists():
            make(root, name)
    return list(DEMO_DATASETS)
