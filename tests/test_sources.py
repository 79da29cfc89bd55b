from __future__ import annotations

from pathlib import Path

import pytest

from common.exceptions import DatasetNotFoundError, EmptyDatasetError
from common.sources import LocalMirror, find_layout
from tasks import samples


def splits(layout: dict[str, dict[str, object]]) -> dict[str, list[str]]:
    return {config: sorted(split_files) for config, split_files in layout.items()}


def test_a_mirror_inside_a_hidden_folder_still_finds_its_files(tmp_path: Path) -> None:
    root = tmp_path / ".stepcache" / "mirror"  # where `make run` keeps it
    samples.csv_dataset(root)
    assert splits(find_layout(LocalMirror(root).directory("org/csv"))) == {"default": ["test", "train"]}


def test_hidden_files_inside_a_dataset_are_not_data(tmp_path: Path) -> None:
    samples.csv_dataset(tmp_path)
    samples.write(tmp_path / "org" / "csv" / ".git" / "objects" / "x.csv", "a\n1\n")
    assert splits(find_layout(tmp_path / "org" / "csv")) == {"default": ["test", "train"]}


def test_the_usual_layouts_and_a_readme_with_configs(tmp_path: Path) -> None:
    assert splits(find_layout(tmp_path / samples.jsonl_dataset(tmp_path))) == {"default": ["test", "train"]}
    assert splits(find_layout(tmp_path / samples.parquet_dataset(tmp_path))) == {"default": ["train"]}
    assert splits(find_layout(tmp_path / samples.multi_config_dataset(tmp_path))) == {
        "en": ["train"],
        "fr": ["test", "train"],
    }
    images = find_layout(tmp_path / samples.image_dataset(tmp_path))["default"]["train"]
    assert images.format == "image" and images.labels == ["cat", "dog", "dog"]


def test_a_missing_or_empty_dataset_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError):
        LocalMirror(tmp_path).directory("org/nothing")
    with pytest.raises(EmptyDatasetError):
        find_layout(tmp_path / samples.empty_dataset(tmp_path))


def test_a_content_hash_is_the_local_revision(tmp_path: Path) -> None:
    mirror = LocalMirror(tmp_path)
    samples.csv_dataset(tmp_path)
    first = mirror.revision("org/csv")
    assert first == mirror.revision("org/csv") and len(first) == 40
    (tmp_path / "org" / "csv" / "test.csv").write_text("id\n9\n")
    assert mirror.revision("org/csv") != first
