"""Where datasets come from: a local mirror laid out like Hub dataset repositories, or the Hub itself.

COMMON_HF_ENDPOINT decides: a `file://` URL or an absolute directory is a :class:`LocalMirror` (a dataset
`org/name` lives in `<root>/org/name/`, a canonical `name` in `<root>/name/`; its revision is a hash of
its files' contents); an http(s) URL is the Hub (:class:`HubSource`, through huggingface_hub, with
COMMON_HF_TOKEN; its revision is the repo's commit sha).

Either way a dataset's files are laid out as on the Hub, and :func:`find_layout` reads that layout:
a README.md whose YAML header has `configs:` (each with `config_name` and `data_files`), or else the usual
conventions: `train.csv` or `train-00000.parquet` at the root, `data/train-*.parquet`, `test/*.jsonl`,
and image or audio folders (`train/cat/1.jpg`, whose parent folder is the label).
"""

from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import yaml

from common.config import get_config
from common.exceptions import DatasetNotFoundError, EmptyDatasetError, InvalidSplitNameError
from common.names import parse_dataset, validate_config, validate_split

DEFAULT_CONFIG = "default"
FORMATS = {
    ".csv": "csv",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".jpg": "image",
    ".jpeg": "image",
    ".png": "image",
    ".gif": "image",
    ".webp": "image",
    ".wav": "audio",
    ".mp3": "audio",
    ".flac": "audio",
    ".ogg": "audio",
}
SPLIT_ALIASES = {
    "training": "train",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "testing": "test",
    "eval": "test",
}


@dataclass
class SplitFiles:
    """The files of one split, all of one format; for image and audio folders, a label per file."""

    format: str
    files: list[Path] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)


Layout = dict[str, dict[str, SplitFiles]]  # config -> split -> files


class DatasetSource(Protocol):
    def revision(self, dataset: str) -> str:
        """The dataset's current revision."""
        ...

    def directory(self, dataset: str) -> Path:
        """A local directory holding the dataset's files at that revision."""
        ...


class LocalMirror:
    """Datasets in folders under `root`, laid out like Hub dataset repositories."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def directory(self, dataset: str) -> Path:
        name = parse_dataset(dataset)
        path = self.root / name.full
        if not path.is_dir():
            raise DatasetNotFoundError(f"dataset {dataset!r} is not in the mirror at {self.root}")
        return path

    def revision(self, dataset: str) -> str:
        directory = self.directory(dataset)
        digest = hashlib.sha1()
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(directory)).encode() + b"\0")
            with path.open("rb") as file:
                while chunk := file.read(1 << 20):
                    digest.update(chunk)
        return digest.hexdigest()


class HubSource:
    """Datasets on the Hub at `endpoint`, downloaded with huggingface_hub into a local cache."""

    def __init__(self, endpoint: str, token: str | None) -> None:
        self.endpoint = endpoint
        self.token = token or None

    def _api(self) -> Any:
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint, token=self.token)

    def revision(self, dataset: str) -> str:
        from huggingface_hub.errors import RepositoryNotFoundError

        from common.redis_connection import get_redis
        from common.resilience import call_hub, hub_breaker

        breaker = hub_breaker(get_redis(get_config().queue.redis_url))
        try:
            info = call_hub(breaker, self._api().dataset_info, parse_dataset(dataset).full, timeout=30)
        except RepositoryNotFoundError as error:
            raise DatasetNotFoundError(f"dataset {dataset!r} is not on the Hub", cause=error) from error
        return str(info.sha)

    def directory(self, dataset: str) -> Path:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                parse_dataset(dataset).full,
                repo_type="dataset",
                revision=self.revision(dataset),
                endpoint=self.endpoint,
                token=self.token,
                etag_timeout=30,
            )
        )


def get_source() -> DatasetSource:
    """The source COMMON_HF_ENDPOINT names."""
    endpoint = get_config().common.hf_endpoint
    return _source(endpoint, get_config().common.hf_token.get_secret_value())


@cache
def _source(endpoint: str, token: str) -> DatasetSource:
    parts = urlsplit(endpoint)
    if parts.scheme == "file":
        return LocalMirror(Path(parts.path))
    if parts.scheme == "":
        return LocalMirror(Path(endpoint))
    return HubSource(endpoint, token)


def find_layout(directory: Path) -> Layout:
    """The configs and splits of a dataset directory, and their files."""
    declared = _declared_configs(directory)
    layout = declared if declared is not None else {DEFAULT_CONFIG: _conventional_splits(directory)}
    layout = {config: splits for config, splits in layout.items() if splits}
    if not layout:
        raise EmptyDatasetError("the dataset has no data files in a supported format")
    return layout


def _data_files(directory: Path) -> list[Path]:
    """The dataset's data files, leaving out hidden files and folders inside it (.git, .cache...)."""
    return sorted(
        path
        for path in directory.rglob("*")
        if path.is_file()
        and path.suffix.lower() in FORMATS
        and not any(part.startswith(".") for part in path.relative_to(directory).parts)
    )


def _add(splits: dict[str, SplitFiles], split: str, path: Path, label: str | None = None) -> None:
    split = SPLIT_ALIASES.get(split.lower(), split)
    try:
        validate_split(split)
    except InvalidSplitNameError:
        split = "train"
    files = splits.setdefault(split, SplitFiles(FORMATS[path.suffix.lower()]))
    if files.format == FORMATS[path.suffix.lower()]:
        files.files.append(path)
        files.labels.append(label)


def _conventional_splits(directory: Path) -> dict[str, SplitFiles]:
    splits: dict[str, SplitFiles] = {}
    for path in _data_files(directory):
        parts = path.relative_to(directory).parts
        if parts[0] == "data" and len(parts) > 1:
            parts = parts[1:]
        kind = FORMATS[path.suffix.lower()]
        if len(parts) == 1:  # train.csv, train-00000-of-00002.parquet
            _add(splits, path.stem.split("-")[0].split(".")[0], path)
        elif kind in ("image", "audio"):  # train/cat/1.jpg, or cat/1.jpg with no split folder
            split_named = len(parts) >= 3
            _add(splits, parts[0] if split_named else "train", path, parts[-2] if len(parts) >= 2 else None)
        else:  # test/0.jsonl
            _add(splits, parts[0], path)
    return splits


def _declared_configs(directory: Path) -> Layout | None:
    readme = directory / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text(errors="replace")
    if not text.startswith("---"):
        return None
    header = text.split("---", 2)[1] if text.count("---") >= 2 else ""
    try:
        metadata = yaml.safe_load(header) or {}
    except yaml.YAMLError:
        return None
    configs = metadata.get("configs") if isinstance(metadata, dict) else None
    if not isinstance(configs, list):
        return None
    files = [p.relative_to(directory).as_posix() for p in _data_files(directory)]
    layout: Layout = {}
    for entry in configs:
        if not isinstance(entry, dict):
            continue
        config = validate_config(str(entry.get("config_name", DEFAULT_CONFIG)))
        splits: dict[str, SplitFiles] = {}
        for split, patterns in _split_patterns(entry.get("data_files")):
            for relative in files:
                if any(fnmatch.fnmatch(relative, pattern) for pattern in patterns):
                    _add(splits, split, directory / relative)
        layout[config] = splits
    return layout


def _split_patterns(data_files: Any) -> list[tuple[str, list[str]]]:
    if isinstance(data_files, str):
        return [("train", [data_files])]
    if isinstance(data_files, list) and all(isinstance(item, str) for item in data_files):
        return [("train", list(data_files))]
    result = []
    for item in data_files or []:
        if isinstance(item, dict):
            path = item.get("path", [])
            result.append((str(item.get("split", "train")), [path] if isinstance(path, str) else list(path)))
    return result
