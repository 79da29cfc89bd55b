"""The files steps write for the API to read: each split's Parquet export and its search index.

Workers write them and API processes read them, so on more than one host both see the same directory,
WORKER_PARQUET_DIRECTORY (a shared volume: docker-compose.yml mounts one into every service). Everything
that touches those files goes through :class:`SplitFiles`: a key names a file
(`<dataset>/--/<revision>/--/<config>/<split>/<name>`, every part a validated name), a writer publishes a
whole file under its key at once (written beside it, then renamed: a reader never sees half a file), a
reader gets a local path to open. Object storage can follow behind the same three methods (a reader would
then get a cached local copy).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

from common.config import get_config
from common.exceptions import CachedResponseNotFoundError
from common.names import validate_key


@dataclass(frozen=True)
class SplitFiles:
    root: Path

    @staticmethod
    def key(dataset: str, revision: str, config: str, split: str, name: str) -> str:
        dataset, config, split = validate_key(dataset, config, split)  # type: ignore[assignment]
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"not a file name: {name!r}")
        return f"{dataset}/--/{revision}/--/{config}/{split}/{name}"

    def path(self, key: str) -> Path:
        """Where the file of `key` is written (or would be)."""
        return self.root / key

    def writing(self, key: str) -> AbstractContextManager[Path]:
        """A temporary path to write the file of `key` at (`written_whole`)."""
        return written_whole(self.path(key))

    def local(self, key: str) -> Path:
        """The file of `key` to read: CachedResponseNotFoundError when there is none, when a part of the key
        is empty, `.` or `..`, or when the path goes through a symbolic link or out of the storage."""
        parts = key.split("/")
        if any(part in ("", ".", "..") or "\\" in part or "\0" in part for part in parts):
            raise CachedResponseNotFoundError(f"no such file: {key}")
        root = os.path.realpath(self.root)
        lexical = os.path.join(root, *parts)
        if os.path.realpath(lexical) != lexical or not os.path.isfile(lexical):
            raise CachedResponseNotFoundError(f"no such file: {key}")
        return Path(lexical)

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


@contextmanager
def written_whole(target: Path) -> Iterator[Path]:
    """A temporary path to write a file at; on success it becomes `target`, whole, at once (writers may
    overlap: each writes its own temporary file beside it); on failure it is removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield temporary
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def split_files() -> SplitFiles:
    return SplitFiles(get_config().worker.parquet_path)
