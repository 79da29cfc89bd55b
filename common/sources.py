"""Where datasets come from: a local mirror laid out like Hub dataset repositories, or the Hub itself.

COMMON_HF_ENDPOINT decides: a `file://` URL or an absolute directory is a :class:`LocalMirror` (a dataset
`org/name` lives in `<root>/org/name/`, a canonical `name` in `<root>/name/`); an http(s) URL is the Hub,
or any server that answers like it (:class:`HubSource`, with COMMON_HF_TOKEN).

A source says two things: a dataset's current revision, and a :class:`Location` where Hugging Face
`datasets` reads the dataset at that revision (common.reading does the reading). How a repository is laid
out (configs in the README's YAML, split names, data_dir, image and audio folders) is `datasets`'s
business, not ours.

Revisions are cheap: the Hub's is the repo's commit sha (one API call, through the shared breaker); a
mirror's is a hash of its manifest (every file's relative path, size and modification time: no byte is
read), kept for a second so that the steps of one job do not walk the tree again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, cast
from urllib.parse import urlsplit

from common.config import get_config
from common.exceptions import CacheableError, DatasetNotFoundError
from common.hub_errors import typed_hub_error
from common.names import parse_dataset

R = TypeVar("R")
MANIFEST_TTL_SECONDS = 1.0
Access = Literal["public", "gated", "private"]
ACCESS_MARKED: tuple[Access, ...] = ("private", "gated")  # a mirror's marker files, the strictest first
MARKER_FILES: dict[str, Access] = {f".{level}": level for level in ACCESS_MARKED}
UNREAD_FOLDERS = frozenset({".git", ".cache", ".huggingface"})  # left out of a mirror dataset's manifest
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Location:
    """Where `datasets` reads one dataset at one revision: a directory, or a repo on the Hub."""

    dataset: str
    path: str  # what `datasets.load_dataset` takes: a local directory or the Hub repo id
    fingerprint: str  # the revision the job reads (a mirror's too: its manifest)
    revision: str | None = None  # the Hub commit `datasets` reads; a mirror's directory has only its present
    token: str | None = None
    endpoint: str | None = None  # the Hub's URL (None: a mirror's directory)

    @property
    def cache_dir(self) -> Path:
        """Where `datasets` keeps what it writes for this dataset (locks, resolved modules): in the host's
        COMMON_HF_CACHE_DIRECTORY, whichever the source."""
        return _cache_path() / "datasets"

    def load_arguments(self) -> dict[str, Any]:
        """The keyword arguments of `datasets.load_dataset` and its siblings for this location. A Hub's
        carry its endpoint: the builder keeps it in its storage options, and its streams read from it
        whatever the libraries' process-wide endpoint says later (a new dict each time: `datasets` writes
        in it)."""
        arguments: dict[str, Any] = {"path": self.path, "cache_dir": str(self.cache_dir)}
        if self.revision is not None:
            arguments |= {"revision": self.revision, "token": self.token}
        if self.endpoint is not None:
            arguments["storage_options"] = {"hf": {"endpoint": self.endpoint, "token": self.token}}
        return arguments

    def owns(self, file: str) -> bool:
        """Whether a data file `datasets` resolved for this location is one of the dataset's own files: in
        its folder once links are followed (a mirror), or in its repo at its revision (the Hub)."""
        if self.revision is None:
            return _inside(Path(file), Path(self.path).resolve())
        prefix = f"hf://datasets/{self.path}@{self.revision}/"
        inside = posixpath.normpath(file.removeprefix(prefix))
        return file.startswith(prefix) and not inside.startswith(("../", "/")) and inside != ".."

    @property
    def token_per_repo_id(self) -> dict[str, str | None]:
        return {self.path: self.token} if self.revision is not None else {}


class DatasetSource(Protocol):
    def revision(self, dataset: str) -> str:
        """The dataset's current revision."""
        ...

    def locate(self, dataset: str, revision: str) -> Location:
        """Where `datasets` reads the dataset at that revision."""
        ...

    def access(self, dataset: str) -> Access:
        """Who may read the dataset: everyone ("public"), or only with a token ("gated", "private")."""
        ...

    def call(self, function: Callable[..., R], *args: Any, retries: bool = False, **kwargs: Any) -> R:
        """Run a call of `datasets` or `huggingface_hub` on this source: the libraries pointed at it while
        it runs (:data:`LIBRARIES`), its errors typed, and a failing Hub counting it. With `retries`, the
        Hub's transient errors are retried with backoff here (for a call the libraries do not retry
        themselves: they retry their downloads and listings, and a stream cannot be resumed)."""
        ...


@dataclass(frozen=True)
class Pointing:
    """What the libraries' process-wide settings must say while a source's call runs: the Hub's endpoint
    and download cache, or offline (a mirror: `endpoint` None)."""

    endpoint: str | None
    hub_cache: Path | None = None

    def apply(self) -> None:
        import datasets.config
        import huggingface_hub.constants as hub_constants

        offline = self.endpoint is None
        datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = hub_constants.HF_HUB_OFFLINE = offline
        if self.endpoint is not None:
            hub_constants.ENDPOINT = datasets.config.HF_ENDPOINT = self.endpoint
            hub_constants.HUGGINGFACE_CO_URL_TEMPLATE = self.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
            datasets.config.HUB_DATASETS_URL = self.endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}"
        if self.hub_cache is not None:
            hub_constants.HF_HUB_CACHE = str(self.hub_cache)


class LibrarySettings:
    """The settings of `huggingface_hub` and `datasets` that name a source (the endpoint, offline mode, the
    Hub's download cache) are module constants of theirs, read all through a call (and by their own
    threads), whatever endpoint a call is given. So every call of a source sets them at its start
    (:meth:`pointed`) and holds them until it returns: calls for the same source run together, a call for
    another source waits until they are done. Nothing is left for a later call to inherit: a process
    reads one source, but two meet in one process in the tests (and in their leftover threads), in any
    order."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._pointing: Pointing | None = None
        self._users = 0  # calls running with the current pointing
        self._waiting = 0  # calls waiting for another: new calls of the current one queue behind them
        self._held = threading.local()

    @contextmanager
    def pointed(self, pointing: Pointing) -> Iterator[None]:
        held: Pointing | None = getattr(self._held, "pointing", None)
        if held is not None:  # a call inside a call of the same thread
            if held != pointing:
                raise RuntimeError(f"a call for {pointing} inside a call for {held}: it would wait for itself")
            yield
            return
        with self._condition:
            if not (self._users == 0 or (self._pointing == pointing and self._waiting == 0)):
                self._waiting += 1
                try:
                    self._condition.wait_for(lambda: self._users == 0 or self._pointing == pointing)
                finally:
                    self._waiting -= 1
            if self._users == 0:
                pointing.apply()  # again even when it is the last one: someone may have changed them since
                self._pointing = pointing
            self._users += 1
        self._held.pointing = pointing
        try:
            yield
        finally:
            self._held.pointing = None
            with self._condition:
                self._users -= 1
                if self._users == 0:
                    self._condition.notify_all()


LIBRARIES = LibrarySettings()
OFFLINE = Pointing(None)


def _typed(function: Callable[..., R], *args: Any, **kwargs: Any) -> R:
    try:
        return function(*args, **kwargs)
    except CacheableError:
        raise
    except Exception as error:
        typed = typed_hub_error(error)
        if typed is None:
            raise
        raise typed from error


class LocalMirror:
    """Datasets in folders under `root`, laid out like Hub dataset repositories; read offline.

    A dataset is exactly one folder and the files under it, with one access decision:

    - `org/name` is the folder `<root>/org/name`, and `<root>/org` holds only folders (datasets); a
      canonical `name` is the folder `<root>/name` holding files of its own (a README, data files). So a
      folder is never a dataset and also inside or around another: `acme` (the folder of `acme/secret`) and
      `vault/data` (a folder inside the canonical `vault`) are not datasets;
    - neither folder is a symbolic link, and no link under the dataset's folder points out of it (such a
      dataset is refused: `datasets` would read the files it points to);
    - its access is the strictest marker file (`.private`, then `.gated`) in the root, the namespace's
      folder, the dataset's folder or any folder under it.

    Whatever breaks these rules is DatasetNotFoundError, whose message names no directory.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._scans: dict[str, tuple[float, _Scan]] = {}
        self._lock = threading.Lock()

    def directory(self, dataset: str) -> Path:
        """The dataset's folder, when it is one (see the class)."""
        name = parse_dataset(dataset)
        namespace, path = self.root / name.namespace, self.root / name.full
        canonical = name.full == name.namespace
        if not (_real_folder(namespace) and _real_folder(path)) or _holds_files(namespace) != canonical:
            raise DatasetNotFoundError(f"dataset {dataset!r} is not in the mirror")
        return path

    def _scan(self, dataset: str) -> _Scan:
        """The dataset's files and markers, walked at most once per MANIFEST_TTL_SECONDS."""
        directory = self.directory(dataset)
        with self._lock:
            at, known = self._scans.get(dataset, (0.0, None))
        if known is not None and time.monotonic() - at < MANIFEST_TTL_SECONDS:
            return known
        scan = _walk(directory)
        if scan.escapes:
            logger.warning("mirror dataset %r refused: links out of its folder: %s", dataset, scan.escapes[:5])
            raise DatasetNotFoundError(
                f"dataset {dataset!r} is not served: links in its folder point out of it (a mirror dataset reads "
                "only its own files)"
            )
        with self._lock:
            self._scans[dataset] = (time.monotonic(), scan)
        return scan

    def revision(self, dataset: str) -> str:
        return self._scan(dataset).digest

    def locate(self, dataset: str, revision: str) -> Location:
        return Location(dataset, str(self.directory(dataset)), revision)

    def access(self, dataset: str) -> Access:
        """The strictest marker in the root, the namespace's folder, the dataset's folder and under it."""
        name = parse_dataset(dataset)
        markers = set(self._scan(dataset).markers)
        for folder in {self.root, self.root / name.namespace}:
            markers.update(level for level in ACCESS_MARKED if (folder / f".{level}").exists())
        return next((level for level in ACCESS_MARKED if level in markers), "public")

    def call(self, function: Callable[..., R], *args: Any, retries: bool = False, **kwargs: Any) -> R:
        """The call, offline: `datasets` never reaches for the network on a mirror's behalf."""
        try:
            with LIBRARIES.pointed(OFFLINE):
                return _typed(function, *args, **kwargs)
        finally:
            _trim_cache()


@dataclass(frozen=True)
class _Scan:
    digest: str  # the revision: a hash of every file's relative path, size and modification time
    markers: tuple[Access, ...]  # the access markers found in the folder or under it
    escapes: tuple[str, ...]  # links pointing out of the folder (relative paths)


def _real_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _holds_files(folder: Path) -> bool:
    """Whether the folder holds anything but folders (or links to folders) and hidden entries: a dataset's
    own files."""
    with os.scandir(folder) as entries:
        return any(not entry.name.startswith(".") and not entry.is_dir() for entry in entries)


def _inside(path: Path, root: Path) -> bool:
    """Whether the path, its links followed, is under `root` (a loop of links is not)."""
    try:
        return path.resolve(strict=False).is_relative_to(root)
    except (OSError, RuntimeError):
        return False


def _walk(directory: Path) -> _Scan:
    """One walk of the dataset's folder: the manifest of its files (leaving out the folders of git and of
    caches, which `datasets` never reads), the access markers in it, and the links that point out of it."""
    root = directory.resolve()
    manifest, markers, escapes = hashlib.sha1(), set(), []
    files: list[tuple[str, int, int]] = []
    stack = [directory]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.name in MARKER_FILES:
                    markers.add(MARKER_FILES[entry.name])
                if entry.is_symlink() and not _inside(Path(entry.path), root):
                    escapes.append(os.path.relpath(entry.path, directory))
                    continue
                if entry.name in UNREAD_FOLDERS:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file():
                    stat = entry.stat()
                    files.append((os.path.relpath(entry.path, directory), stat.st_size, stat.st_mtime_ns))
    for relative, size, mtime_ns in sorted(files):
        manifest.update(f"{relative}\0{size}\0{mtime_ns}\n".encode(errors="surrogateescape"))
    return _Scan(manifest.hexdigest(), tuple(markers), tuple(escapes))


class HubSource:
    """Datasets on the Hub at `endpoint`: read by `datasets` in streaming mode, only the bytes a step needs.

    Every call goes through the Hub's shared circuit breaker (common.resilience); the libraries retry their
    own listings and downloads, and the revision is retried here. Files the libraries download (READMEs,
    metadata) go to COMMON_HF_CACHE_DIRECTORY, trimmed to COMMON_HF_CACHE_MAX_BYTES.

    The endpoint goes with every call: in the locations it gives (`datasets`'s storage options), in its own
    HfApi, and in the libraries' process-wide settings while the call runs (:class:`LibrarySettings`).
    """

    def __init__(self, endpoint: str, token: str | None) -> None:
        self.endpoint = endpoint
        self.token = token or None
        configure_hub_libraries(get_config().common.hf_timeout_seconds)

    def call(self, function: Callable[..., R], *args: Any, retries: bool = False, **kwargs: Any) -> R:
        from common.redis_connection import get_redis
        from common.resilience import call_hub, call_hub_once, hub_breaker

        breaker = hub_breaker(get_redis(get_config().queue.redis_url))
        try:
            call = call_hub if retries else call_hub_once
            with LIBRARIES.pointed(Pointing(self.endpoint, _cache_path() / "hub")):
                return cast(R, call(breaker, _typed, function, *args, **kwargs))
        finally:
            _trim_cache()

    def revision(self, dataset: str) -> str:
        return str(self._info(dataset).sha)

    def _info(self, dataset: str) -> Any:
        from huggingface_hub import HfApi

        api = HfApi(endpoint=self.endpoint, token=self.token, library_name="stepcache")
        timeout = get_config().common.hf_timeout_seconds
        return self.call(api.dataset_info, parse_dataset(dataset).full, timeout=timeout, retries=True)

    def locate(self, dataset: str, revision: str) -> Location:
        return Location(dataset, parse_dataset(dataset).full, revision, revision, self.token, self.endpoint)

    def access(self, dataset: str) -> Access:
        info = self._info(dataset)
        return "private" if info.private else "gated" if info.gated else "public"


def _cache_path() -> Path:
    return get_config().common.hf_cache_path


def _trim_cache() -> None:
    from common.download_cache import trim_soon

    trim_soon(_cache_path(), get_config().common.hf_cache_max_bytes)


def configure_hub_libraries(timeout: float) -> None:
    """The settings of `huggingface_hub` and `datasets` that are the same for every source: `timeout` on
    every HTTP request, their retries, no telemetry or progress bars. (`datasets` would also ask the Hub's
    dataset viewer for the features and splits it computed: we compute them.) What names a source (its
    endpoint, offline mode, the download cache) is set per call: :class:`LibrarySettings`."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import datasets
    import datasets.config
    import httpx2
    import huggingface_hub.constants as hub_constants
    from huggingface_hub.utils import _http
    from huggingface_hub.utils.tqdm import disable_progress_bars

    hub_constants.HF_HUB_ETAG_TIMEOUT = hub_constants.HF_HUB_DOWNLOAD_TIMEOUT = int(max(1, timeout))
    datasets.config.USE_PARQUET_EXPORT = False  # we are the dataset viewer: never ask one for its answers
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False  # no HEAD to an S3 bucket per dataset it resolves
    bounded = httpx2.Timeout(timeout).as_dict()

    def bound(request: httpx2.Request) -> None:  # also the requests the libraries send with timeout=None
        request.extensions["timeout"] = bounded

    _http.set_client_factory(
        lambda: httpx2.Client(
            event_hooks={"request": [bound, _http.hf_request_event_hook]}, follow_redirects=True, timeout=timeout
        )
    )
    # `datasets` retries a failing stream 20 times, 5 s apart, on top of huggingface_hub's retries: a Hub
    # that stopped answering held a job for half an hour. Once more, a second later, is enough.
    datasets.config.STREAMING_READ_MAX_RETRIES = datasets.config.STREAMING_OPEN_MAX_RETRIES = 1
    datasets.config.STREAMING_READ_RETRY_INTERVAL = datasets.config.STREAMING_OPEN_RETRY_INTERVAL = 1
    disable_progress_bars()
    datasets.disable_progress_bars()


def get_source() -> DatasetSource:
    """The source COMMON_HF_ENDPOINT names."""
    settings = get_config().common
    return _source(settings.hf_endpoint, settings.hf_token.get_secret_value())


@cache
def _source(endpoint: str, token: str) -> DatasetSource:
    parts = urlsplit(endpoint)
    if parts.scheme == "file":
        return LocalMirror(Path(parts.path))
    if parts.scheme == "":
        return LocalMirror(Path(endpoint))
    return HubSource(endpoint, token)
