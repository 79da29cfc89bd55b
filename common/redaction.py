"""What a message may say about the machine that wrote it: nothing. :func:`redact` takes out of a text (an
error of `datasets`, `pyarrow` or the OS, which names the files it failed on) what belongs to this
deployment:

- an absolute local path (or `file://` URL): made relative to the data root it is under (a local mirror's
  root, COMMON_HF_CACHE_DIRECTORY, WORKER_PARQUET_DIRECTORY, ASSETS_STORAGE_DIRECTORY), else cut to its
  last part (`.../name`);
- this machine's host name: `<host>`.

URLs keep their paths (`https://hub.example/api/datasets/org/name`): a `/` after a word character, `.`,
`:` or another `/` does not start a local path.
"""

from __future__ import annotations

import re
import socket
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

from common.config import get_config

_LOCAL_PATH = re.compile(r"(?:file://(?=/)|(?<![\w.~:/-]))(?P<path>/[^\s'\"`<>()\[\]{},;|]+)")
HOST = "<host>"


def redact(text: str) -> str:
    """`text` without local paths and the host name (see the module)."""
    roots = _roots()

    def relative(match: re.Match[str]) -> str:
        path = match.group("path")
        for root in roots:
            if path == root or path.startswith(f"{root}/"):
                return path[len(root) :].lstrip("/") or "."
        return ".../" + path.rstrip("/").rsplit("/", 1)[-1]

    return _host_name().sub(HOST, _LOCAL_PATH.sub(relative, text))


def _roots() -> list[str]:
    """The data roots, absolute and resolved, the deepest first."""
    settings = get_config()
    roots = [settings.common.hf_cache_path, settings.worker.parquet_path, settings.assets.storage_path]
    endpoint = urlsplit(settings.common.hf_endpoint)
    if endpoint.scheme in ("file", ""):  # a local mirror (common.sources)
        roots.append(Path(endpoint.path))
    texts = {str(form).rstrip("/") for root in roots for form in (root.absolute(), root.resolve())}
    return sorted((text for text in texts if text), key=len, reverse=True)


@cache
def _host_name() -> re.Pattern[str]:
    names = sorted({socket.gethostname(), socket.gethostname().split(".")[0]} - {""}, key=len, reverse=True)
    alternatives = "|".join(re.escape(name) for name in names) or "(?!)"  # no name: matches nothing
    return re.compile(rf"(?<![\w-])(?:{alternatives})(?![\w-])")
