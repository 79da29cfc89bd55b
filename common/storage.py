"""The files steps write for the API to read: each split's Parquet export and its search index.

Workers write them and API processes read them, so on more than one host both see the same directory,
WORKER_PARQUET_DIRECTORY (a shared volume: docker-compose.yml mounts one into every service). Everything
that touches those files goes through :class:`SplitFiles`: a key names a file
(`<dataset>/--/<revision>/--/<config>/<split>/<name>`, every part a validated name), a writer publishes a
whole file at its path at once (:func:`written_whole`: written beside it, then renamed, so a reader never
sees half a file), a reader gets a local path to open (`local`: :func:`inside` the storage). Object storage
can follow behind the same methods (a reader would then get a cached local copy).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
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

    def local(self, key: str) -> Path:
        """The file of `key` to read: CachedResponseNotFoundError when it is not a file :func:`inside` the
        storage."""
        found = inside(self.root, key)
        if found is None:
            raise CachedResponseNotFoundError(f"no such file: {key}")
        return found

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


def safe_parts(path: str) -> list[str] | None:
    """The parts of a relative `path`, or None when one is empty, `.` or `..`, or holds a backslash or NUL
    (nothing on disk is looked at)."""
    parts = path.split("/")
    if any(part in ("", ".", "..") or "\\" in part or "\0" in part for part in parts):
        return None
    return parts


def inside(root: Path, path: str) -> Path | None:
    """The regular file the relative `path` names under `root`, or None: a part that is not safe
    (:func:`safe_parts`), a path through a symbolic link or out of `root`, or not a file."""
    parts = safe_parts(path)
    if parts is None:
        return None
    real_root = os.path.realpath(root)
    lexical = os.path.join(real_root, *parts)
    if os.path.realpath(lexical) != lexical or not os.path.isfile(lexical):
        return None
    return Path(lexical)


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
