"""What `datasets` resolves about a repository, resolved once per revision and kept on the host.

Before it reads anything, `datasets` resolves a repository into a "dataset module": its configs and, for
each, its data files. Without configs in the README it tries each of its ~45 file-name patterns against
the repository's file list, which costs seconds on a repository of 20,000 files (on a local mirror, every
pattern walks the tree). Every step of a dataset needs it, at the same revision.

Inside :func:`kept_at` (which common.reading wraps around its calls), `datasets`'s
`dataset_module_factory` keeps its answer, keyed by the repository and the revision: in the process, and
pickled under `<COMMON_HF_CACHE_DIRECTORY>/datasets/modules/` for the host's other processes (trimmed with the rest
of that cache). A Hub revision is a commit; a mirror's is its manifest (files, sizes and times), so a
changed file is another key. Outside it, `datasets` works as it always does.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import pickle
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

MEMORY_ENTRIES = 32

_key: ContextVar[tuple[str, Path] | None] = ContextVar("stepcache_dataset_module_key", default=None)
_memory: OrderedDict[str, bytes] = OrderedDict()
_lock = threading.Lock()


@contextlib.contextmanager
def kept_at(repository: str, revision: str, cache_dir: Path) -> Iterator[None]:
    """Within the block, a repository's dataset module at `revision` is resolved once and kept."""
    _install()
    token = _key.set((f"{repository}@{revision}", cache_dir / "modules"))
    try:
        yield
    finally:
        _key.reset(token)


def _install() -> None:
    import datasets.inspect
    import datasets.load

    factory = datasets.load.dataset_module_factory
    if getattr(factory, "stepcache_kept", False):
        return
    kept = _keeping(factory)
    datasets.load.dataset_module_factory = datasets.inspect.dataset_module_factory = kept


def _keeping(factory: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(factory)
    def kept(path: str, *args: Any, **kwargs: Any) -> Any:
        key = _key.get()
        if key is None or args:
            return factory(path, *args, **kwargs)
        repository, directory = key
        # What else shapes the answer: the arguments that are not the download's own settings.
        shaping = {name: kwargs.get(name) for name in ("data_dir", "data_files")}
        name = hashlib.sha1(repr((repository, path, sorted(shaping.items()))).encode()).hexdigest()
        pickled = _remembered(name, directory / f"{name}.pickle")
        if pickled is None:
            pickled = pickle.dumps(factory(path, **kwargs))
            _remember(name, directory / f"{name}.pickle", pickled)
        return pickle.loads(pickled)  # a fresh copy: load_dataset_builder pops from what it gets

    kept.stepcache_kept = True  # type: ignore[attr-defined]
    return kept


def _remembered(name: str, path: Path) -> bytes | None:
    with _lock:
        if name in _memory:
            _memory.move_to_end(name)
            return _memory[name]
    try:
        pickled = path.read_bytes()
    except OSError:
        return None
    _remember(name, None, pickled)
    return pickled


def _remember(name: str, path: Path | None, pickled: bytes) -> None:
    with _lock:
        _memory[name] = pickled
        while len(_memory) > MEMORY_ENTRIES:
            _memory.popitem(last=False)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        temporary.write_bytes(pickled)
        os.replace(temporary, path)  # whole or not at all, whoever writes it at the same time
