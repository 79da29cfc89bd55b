"""Reading datasets with Hugging Face `datasets`: configs, splits, features and rows, in streaming mode.

Whatever the layout or format `datasets` reads (CSV, TSV, JSON Lines, Parquet, Arrow, text, image and
audio folders, compressed and sharded files, configs declared in the README), a step sees the same
thing: the config names, a config's split names, and a :class:`Split` whose rows come in Arrow batches,
read as they are consumed. Nothing reads more of a file than the rows asked for, give or take the
reader's block; a Hub dataset's files are read over HTTP ranges, never downloaded whole.

Image and audio columns are read undecoded (`{"bytes", "path"}`): a step embeds the bytes of the rows it
keeps (:meth:`Split.embed`), without decoding what it only stores.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pyarrow as pa

from common.dataset_modules import kept_at
from common.exceptions import ConfigNotFoundError, DataFilesOutsideDatasetError, SplitNotFoundError
from common.redaction import redact
from common.sources import DatasetSource, Location

if TYPE_CHECKING:
    from datasets import Features, IterableDataset

logger = logging.getLogger(__name__)
R = TypeVar("R")
MEDIA_TYPES = ("Image", "Audio")
PARQUET_BATCH_ROWS = 1_000


def preload_reading() -> None:
    """Import `datasets` now (a worker's main process does, before its pool forks)."""
    import datasets  # noqa: F401


def config_names(source: DatasetSource, location: Location) -> list[str]:
    from datasets import get_dataset_config_names

    with _resolved_once(location):
        return list(source.call(get_dataset_config_names, **location.load_arguments()))


def split_names(source: DatasetSource, location: Location, config: str) -> list[str]:
    """The config's split names, from its data files' names (no file is read) or else from `datasets`."""
    from datasets import get_dataset_split_names

    builder = _builder(source, location, config)
    if builder.config.data_files:
        return [str(split) for split in builder.config.data_files]
    try:
        return list(source.call(get_dataset_split_names, **location.load_arguments(), config_name=config))
    except ValueError as error:
        raise _config_not_found(error, location, config) from error


def _builder(source: DatasetSource, location: Location, config: str) -> Any:
    from datasets import load_dataset_builder
    from datasets.packaged_modules.parquet.parquet import ParquetConfig

    if location.revision is None:  # a mirror's README: its patterns checked before any is resolved
        _check_readme_patterns(location, config)
    try:
        with _resolved_once(location):
            builder = source.call(load_dataset_builder, **location.load_arguments(), name=config)
    except ValueError as error:
        raise _config_not_found(error, location, config) from error
    data_files = (builder.config.data_files or {}).values()
    if any(not location.owns(file) for files in data_files for file in files):
        raise _outside(location, config)
    if isinstance(builder.config, ParquetConfig) and builder.config.batch_size is None:
        # It would read a whole row group at a time (a million rows, as pandas and pyarrow write them),
        # and fail on a file with no rows (a batch of 0).
        builder.config.batch_size = PARQUET_BATCH_ROWS
    return builder


def _outside(location: Location, config: str) -> DataFilesOutsideDatasetError:
    return DataFilesOutsideDatasetError(
        f"config {config!r} of {location.dataset!r} names data files outside the dataset's own files (a '..', "
        "an absolute path or a URL in its README's data_files or data_dir): they are not read"
    )


def _check_readme_patterns(location: Location, config: str) -> None:
    """Refuse a README whose `configs` name data files by an absolute path, a `..` or a URL: `datasets`
    would search the worker's disk for them (a glob such as `/usr/**/*.txt`) before anything checks them."""
    import yaml

    readme = Path(location.path) / "README.md"
    try:
        text = readme.read_text(errors="replace")
        front = yaml.safe_load(text.split("---", 2)[1]) if text.startswith("---") and text.count("---") >= 2 else {}
    except (OSError, yaml.YAMLError):
        return  # no README, or one `datasets` itself will refuse
    configs = front.get("configs") if isinstance(front, dict) else None
    for entry in configs if isinstance(configs, list) else []:
        if isinstance(entry, dict) and any(_escapes(pattern) for pattern in _patterns(entry)):
            raise _outside(location, config)


def _patterns(entry: dict[str, Any]) -> Iterator[str]:
    """Every path or pattern a README config names: its `data_dir`, and its `data_files` in any of their forms
    (a string, a list of strings, a list of {split, path}, a {split: path} mapping)."""
    values = [entry.get("data_dir"), entry.get("data_files")]
    while values:
        value = values.pop()
        if isinstance(value, str):
            yield value
        elif isinstance(value, list):
            values += value
        elif isinstance(value, dict):
            values += [value.get("path")] if "path" in value else list(value.values())


def _escapes(pattern: str) -> bool:
    return pattern.startswith(("/", "\\", "~")) or ".." in pattern.replace("\\", "/").split("/") or ":" in pattern


@dataclass
class Split:
    """One split of a config, open for reading in streaming mode."""

    source: DatasetSource
    location: Location
    stream: IterableDataset
    features: Features
    builder: Any  # the stream's builder: see _reading
    name: str = ""

    def expected_size(self) -> tuple[int | None, int | None]:
        """What a pass over the split is measured against (progress only): the rows the dataset's card says
        the split has, and the bytes of its data files as stored (compressed or not). Either is None when
        it is not known: no card figures, a size that cannot be read without reading the file."""
        splits = self.stream.info.splits if self.stream.info is not None else None
        described = splits.get(self.name) if splits else None
        rows = described.num_examples if described is not None and described.num_examples else None
        return rows, self._stored_bytes()

    def _stored_bytes(self) -> int | None:
        from datasets import DownloadConfig
        from datasets.utils.file_utils import is_local_path, xgetsize

        files = [str(file) for file in (self.builder.config.data_files or {}).get(self.name, [])]
        # Local files, or the Hub's (whose size its file system knows, from the listing that resolved them);
        # anything else xgetsize would measure by downloading it.
        if not files or not all(is_local_path(file) or file.startswith("hf://") for file in files):
            return None
        download = DownloadConfig(token=self.builder.token, storage_options=self.builder.storage_options)
        try:
            return sum(int(self.source.call(_reading, self.builder, xgetsize, file, download)) for file in files)
        except Exception:  # progress only: the conversion goes on without a total
            logger.info("the data files of split %r could not be measured", self.name, exc_info=True)
            return None

    def batches(self, rows: int) -> Iterator[pa.Table]:
        """The split's rows in Arrow tables of `rows` rows (the last one shorter), media not embedded.
        Each batch is read when asked for; a Hub error in the middle is typed and counted by the breaker."""
        iterator = iter(self.stream.with_format("arrow").iter(batch_size=rows))
        while (table := self.source.call(_reading, self.builder, next, iterator, None)) is not None:
            yield table

    def embed(self, table: pa.Table) -> pa.Table:
        """The table with the bytes of its image and audio files inside it."""
        from datasets.table import embed_table_storage

        if not self.has_media:
            return table
        self._check_media_paths(table)
        embedded: pa.Table = self.source.call(
            embed_table_storage, table, token_per_repo_id=self.location.token_per_repo_id
        )
        return embedded

    def _check_media_paths(self, table: pa.Table) -> None:
        """Refuse to embed a media file that is not one of the dataset's own (a cell's path can name any
        file of the worker's disk, or any URL: `datasets` would read it)."""
        from datasets.features.features import require_storage_embed

        for name, feature in self.features.items():
            if name in table.column_names and require_storage_embed(feature):
                outside = [path for path in _unembedded(table.column(name).to_pylist()) if not self.location.owns(path)]
                if outside:
                    raise DataFilesOutsideDatasetError(
                        f"column {name!r} of {self.location.dataset!r} names {len(outside)} media files outside the "
                        "dataset's own files: they are not read"
                    )

    @property
    def has_media(self) -> bool:
        return any(feature_type(feature) in MEDIA_TYPES for feature in self.features.values())


def _unembedded(value: Any) -> Iterator[str]:
    """The paths of the media cells in `value` whose bytes are not there yet (what embedding would read)."""
    if isinstance(value, dict):
        if isinstance(value.get("path"), str) and value.get("bytes") is None:
            yield value["path"]
        for item in value.values():
            yield from _unembedded(item)
    elif isinstance(value, list):
        for item in value:
            yield from _unembedded(item)


def open_split(source: DatasetSource, location: Location, config: str, split: str) -> Split:
    """The split, ready to stream; ConfigNotFoundError or SplitNotFoundError when it is not there."""
    import datasets
    from datasets.features.features import require_decoding

    builder = _builder(source, location, config)
    try:
        stream = source.call(builder.as_streaming_dataset, split=split)
    except ValueError as error:
        if "Bad split" not in str(error):
            raise
        raise SplitNotFoundError(f"config {config!r} of {location.dataset!r} has no split {split!r}", error) from error
    if stream.features is None:  # CSV, JSON...: the features are those of the first rows
        try:
            stream = source.call(_reading, builder, stream._resolve_features)
        except StopIteration:  # no rows: no features to tell
            return Split(source, location, stream, datasets.Features({}), builder, split)
    if any(require_decoding(feature) for feature in stream.features.values()):
        # Media cells stay their files' paths (and bytes, when the file holds them): `embed` reads the files,
        # inside this source's call. A stream from a Hub otherwise decodes them in a pool of threads of its
        # own, ahead of the rows asked for, so outside the call that set the libraries' endpoint.
        stream = stream.decode(False)
    return Split(source, location, stream, stream.features, builder, split)


def _reading(builder: Any, function: Callable[..., R], *args: Any) -> R:
    """A read of the builder's stream, with the builder's own endpoint and token. `datasets` patches the
    module of a builder (its `open`, `pandas.read_csv`...) once for streaming, with one download config
    per module that every new builder of that module overwrites with its own storage options: without
    this, a stream would open its next files with those of the last builder made in the process, whatever
    its source."""
    from datasets.streaming import extend_dataset_builder_for_streaming

    extend_dataset_builder_for_streaming(builder)
    return function(*args)


def _resolved_once(location: Location) -> contextlib.AbstractContextManager[None]:
    """What `datasets` resolves about the repository (its configs and data files), once per revision."""
    return kept_at(location.path, location.fingerprint, location.cache_dir)


def _config_not_found(error: ValueError, location: Location, config: str) -> Exception:
    if "BuilderConfig" in str(error) and "not found" in str(error):
        return ConfigNotFoundError(redact(f"dataset {location.dataset!r} has no config {config!r}: {error}"), error)
    return error


def feature_type(feature: Any) -> str:
    """The `_type` of a feature: Value, ClassLabel, Image, Audio, List..."""
    return str(getattr(feature, "_type", type(feature).__name__))
