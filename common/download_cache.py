"""The host's cache of files read from the Hub, bounded in size: the oldest files go first.

Steps read datasets in streaming mode, so what lands here is what the libraries download whole (READMEs,
metadata, the modules `datasets` resolves); every step of every worker on the host shares it. After a Hub
call, :func:`trim_soon` walks it at most once a minute per process and, past COMMON_HF_CACHE_MAX_BYTES,
deletes the files used least recently until it fits. A file another process still reads stays readable
(its descriptor is open); one deleted under `huggingface_hub`'s feet is downloaded again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)
TRIM_INTERVAL_SECONDS = 60.0

_lock = threading.Lock()
_last_trim: dict[Path, float] = {}


def trim_soon(directory: Path, max_bytes: int) -> None:
    """Trim `directory` to `max_bytes` unless this process did it less than a minute ago."""
    with _lock:
        if time.monotonic() - _last_trim.get(directory, -TRIM_INTERVAL_SECONDS) < TRIM_INTERVAL_SECONDS:
            return
        _last_trim[directory] = time.monotonic()
    trim(directory, max_bytes)


def trim(directory: Path, max_bytes: int) -> int:
    """Delete the least recently used files under `directory` until it holds at most `max_bytes`;
    returns the bytes freed."""
    files: list[tuple[float, int, str]] = []
    for folder, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(folder, name)
            try:
                stat = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                continue
            files.append((max(stat.st_atime, stat.st_mtime), stat.st_size, path))
    excess = sum(size for _, size, _ in files) - max_bytes
    freed = 0
    for _, size, path in sorted(files):
        if freed >= excess:
            break
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        freed += size
    if freed:
        logger.info("trimmed %d bytes from the Hub file cache at %s", freed, directory)
    return freed
