"""dataset-filetypes: how many files of each extension the dataset's repository holds, at the revision its
entries were computed at: a mirror's folder walked (its hidden files and folders left out: git's, caches,
access markers), or the Hub's listing of the repository (one call). Nothing is read or downloaded. It runs
after dataset-is-valid (the dataset's other entries are all in then), so that dataset-modalities,
dataset-compatible-libraries and dataset-hub-cache, which follow it one after the other, read them all.

A compressed file counts twice, as the viewer does: `train.csv.gz` is a `.gz` and a `.csv` compressed in
`.gz`. Files inside archives are not looked into.
"""

from __future__ import annotations

import os
import posixpath
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common.names import parse_dataset
from common.sources import HubSource, LocalMirror, get_source
from tasks.step_task import StepJob

COMPRESSIONS = frozenset({".gz", ".bz2", ".xz", ".zst", ".lz4"})
Kind = tuple[str, str | None]  # (extension, compressed in)


def extension_of(name: str) -> str:
    """The file's extension, lower case, cleaned of what follows it in some repositories (`.txt_1`,
    `.gz?dl=1`, `.txt-00000-of-00100`: `.txt`, `.gz`, `.txt`)."""
    extension = posixpath.splitext(name)[1].lower()
    for separator in "?-_":
        extension = extension.split(separator)[0]
    return extension


def kinds_of(path: str) -> list[Kind]:
    name = posixpath.basename(path)
    extension = extension_of(name)
    if not extension:
        return []
    if extension in COMPRESSIONS:
        inner = posixpath.splitext(posixpath.splitext(name)[0])[1].lower()
        return [(extension, None), *([(inner, extension)] if inner else [])]
    return [(extension, None)]


def count_filetypes(paths: Iterator[str] | list[str]) -> list[dict[str, Any]]:
    """[{"extension", "count"} and "compressed_in" for a compressed file's own extension], by extension."""
    counter: Counter[Kind] = Counter(kind for path in paths for kind in kinds_of(path))
    return [
        {"extension": extension, "count": count, **({"compressed_in": compressed} if compressed else {})}
        for (extension, compressed), count in sorted(counter.items(), key=lambda item: (item[0][0], item[0][1] or ""))
    ]


def _mirror_files(directory: Path) -> Iterator[str]:
    for folder, folders, files in os.walk(directory):
        folders[:] = [name for name in folders if not name.startswith(".")]
        for name in files:
            if not name.startswith("."):
                yield os.path.relpath(os.path.join(folder, name), directory)


def _hub_files(source: HubSource, dataset: str, revision: str) -> list[str]:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=source.endpoint, token=source.token, library_name="stepcache")
    repo = parse_dataset(dataset).full
    files = source.call(api.list_repo_files, repo, repo_type="dataset", revision=revision, retries=True)
    return [str(path) for path in files if not any(part.startswith(".") for part in str(path).split("/"))]


def dataset_filetypes(job: StepJob) -> dict[str, Any]:
    """{"filetypes": [{"extension", "count", "compressed_in"?}]}"""
    job.previous_step("dataset-is-valid")  # the revision the files are listed at
    source = get_source()
    job.progress.update(0, 1, "listing the dataset's files")
    if isinstance(source, LocalMirror):
        paths = list(_mirror_files(source.directory(job.dataset)))
    elif isinstance(source, HubSource):
        paths = _hub_files(source, job.dataset, job.revision)
    else:  # a source of another kind lists nothing
        paths = []
    job.progress.update(1, 1, f"{len(paths)} file(s)")
    return {"filetypes": count_filetypes(paths)}
