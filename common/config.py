"""Settings every stepcache process reads, one pydantic-settings model per environment prefix.

The names and defaults of the ASSETS_, COMMON_, CACHE_ and QUEUE_ variables are those of the
dataset-viewer's libcommon; QUEUE_REDIS_URL and the WORKER_ and API_ prefixes are stepcache's own.
Values come from the environment (and an optional `.env` file in the working directory), then from the
TOML or YAML file STEPCACHE_CONFIG names, a section per prefix (common.config_file), then the defaults.

A bad value stops the process at start: :func:`get_config` raises :class:`ConfigError` whose message is
one line naming the variable (or the file and its `section.key`) and what it accepts, and
:func:`get_config_or_exit` prints that line and exits with status 2. Passwords inside URLs, the Hub token
and the API's keys and secrets are secrets, wherever they come from: their repr and str are masked, and
the error line never shows them.
"""

from __future__ import annotations

import os
import re
import sys
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, NoReturn
from urllib.parse import urlsplit, urlunsplit

import platformdirs
from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, DotEnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from common.config_file import file_source, section_name, value_in_file
from common.exceptions import ConfigError
from common.redis_connection import parse_redis_url

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
LogFormat = Literal["plain", "json"]

ASSETS_BASE_URL = "assets"
ASSETS_STORAGE_DIRECTORY = ""
ASSETS_DEFAULT_SUBDIRECTORY = "datasets_server_assets"
COMMON_HF_ENDPOINT = "https://huggingface.co"
COMMON_HF_TOKEN = ""
COMMON_HF_TIMEOUT_SECONDS = 10.0
COMMON_HF_CACHE_DIRECTORY = ""
COMMON_HF_CACHE_MAX_BYTES = 10_000_000_000
COMMON_LOG_LEVEL: LogLevel = "INFO"
COMMON_LOG_FORMAT: LogFormat = "plain"
COMMON_REGISTRY_TTL_SECONDS = 30.0
COMMON_REGISTRY_ADVERTISE_HOST = ""
CACHE_MONGO_DATABASE = "datasets_server_cache"
CACHE_MONGO_URL = "mongodb://localhost:27017"
QUEUE_LEDGER_LAG_SECONDS = 0.1
QUEUE_MAX_JOBS_PER_NAMESPACE = 1
QUEUE_BORROW = False  # a namespace at its limit borrows no idle capacity (common/queue/borrowing.py)
QUEUE_MONGO_DATABASE = "datasets_server_queue"
QUEUE_MONGO_URL = "mongodb://localhost:27017"
QUEUE_REDIS_URL = "redis://localhost:6379/0"
WORKER_HEARTBEAT_INTERVAL_SECONDS = 10.0
WORKER_MAX_MISSING_HEARTBEATS = 3
WORKER_MAX_JOB_DURATION_SECONDS = 20 * 60
WORKER_CONTENT_MAX_BYTES = 10_000_000
WORKER_MAX_ATTEMPTS = 3
WORKER_METRICS_PORT = 9808
WORKER_METRICS_HOST = "127.0.0.1"
WORKER_PARQUET_DIRECTORY = ""
WORKER_FIRST_ROWS_MAX_BYTES = 1_000_000
WORKER_FIRST_ROWS_MAX_COLUMNS = 1_000
WORKER_FIRST_ROWS_MIN_CELL_BYTES = 100
WORKER_FIRST_ROWS_MAX_ROWS = 100
WORKER_FIRST_ROWS_MAX_CELL_BYTES = 100_000
WORKER_PARQUET_MAX_BYTES = 1_000_000_000
WORKER_MAX_FAILED_RUNS = 3
WORKER_QUEUED_LEASE_SECONDS = 300.0
WORKER_HARD_LIMIT_GRACE_SECONDS = 30.0
API_HOST = "127.0.0.1"
API_PORT = 8000
API_METRICS_PORT = 9809
MIN_SECRET_LENGTH = 16


def mask_url(url: str) -> str:
    """The URL with its password (or a lone user token) replaced by `***`; unparsable input fully masked.
    A cluster's or Sentinels' URL lists several host:port after the credentials."""
    try:
        parts = urlsplit(url)
        userinfo, at, hosts = parts.netloc.rpartition("@")
        if not at:
            return url
        username, has_password, _ = userinfo.partition(":")
        user = f"{username}:***" if has_password else "***"
        return urlunsplit(parts._replace(netloc=f"{user}@{hosts}"))
    except ValueError:
        return "***"


class SecretUrl(SecretStr):
    """A URL that may carry credentials: shown with its password masked, read with get_secret_value()."""

    def _display(self) -> str:
        return mask_url(self.get_secret_value())

    def __repr__(self) -> str:
        return f"SecretUrl({self._display()!r})"


def _scheme_checker(*schemes: str) -> AfterValidator:
    def check(value: SecretStr) -> SecretUrl:
        url = value.get_secret_value()
        if urlsplit(url).scheme not in schemes:
            raise ValueError(f"must be a URL starting with {' or '.join(s + '://' for s in schemes)}")
        return SecretUrl(url)

    return AfterValidator(check)


def _check_redis_url(value: SecretStr) -> SecretUrl:
    url = value.get_secret_value()
    parse_redis_url(url)  # one Redis, a cluster or Sentinels; its ValueError says which forms are taken
    return SecretUrl(url)


MongoUrl = Annotated[SecretStr, _scheme_checker("mongodb", "mongodb+srv")]
RedisUrl = Annotated[SecretStr, AfterValidator(_check_redis_url)]


def _check_hf_endpoint(value: str) -> str:
    scheme = urlsplit(value).scheme
    if scheme in ("http", "https", "file") or (scheme == "" and value.startswith("/")):
        return value.rstrip("/") if scheme else value
    raise ValueError("must be an http(s):// URL, a file:// URL or an absolute directory path")


HfEndpoint = Annotated[str, AfterValidator(_check_hf_endpoint)]


class _Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments, then the environment, then `.env`, then the settings of a live `python -m tasks run`
        of this checkout, then the class's section of the STEPCACHE_CONFIG file: the first that has a value
        gives it."""
        in_file = file_source(settings_cls, AppConfig.PREFIXES)
        run_file = live_run_environment()
        of_run = [DotEnvSettingsSource(settings_cls, env_file=run_file)] if run_file else []
        sources = (init_settings, env_settings, dotenv_settings, file_secret_settings, *of_run)
        return (*sources, *([in_file] if in_file else []))


RUN_ENVIRONMENT_VARIABLE = "STEPCACHE_RUN_ENV"  # empty: ignore a running `python -m tasks run`
RUN_ENVIRONMENT = Path(__file__).resolve().parent.parent / ".stepcache" / "env"


def live_run_environment() -> Path | None:
    """The file where `python -m tasks run` (make run) of this checkout wrote the servers and settings it
    chose, while that run lives (its first line names its process: a file left by a run that ended is
    ignored), so that the CLI, a `python -c` and a second worker started here use them without exports.
    STEPCACHE_RUN_ENV names another file, or none when empty."""
    named = os.environ.get(RUN_ENVIRONMENT_VARIABLE)
    path = RUN_ENVIRONMENT if named is None else Path(named) if named else None
    try:
        named_process = re.match(r"# pid (\d+)\b", path.read_text()) if path is not None else None
        pid = int(named_process.group(1)) if named_process else 0
        if pid > 0:
            os.kill(pid, 0)
            return path
    except (OSError, ValueError):
        pass
    return None


class AssetsConfig(_Settings):
    model_config = SettingsConfigDict(env_prefix="ASSETS_")

    base_url: str = ASSETS_BASE_URL
    storage_directory: str = ASSETS_STORAGE_DIRECTORY

    @property
    def storage_path(self) -> Path:
        """Where asset files go: the configured directory, or one inside the OS default cache directory."""
        if self.storage_directory:
            return Path(self.storage_directory)
        return Path(platformdirs.user_cache_dir()) / ASSETS_DEFAULT_SUBDIRECTORY


class CommonConfig(_Settings):
    model_config = SettingsConfigDict(env_prefix="COMMON_")

    hf_endpoint: HfEndpoint = COMMON_HF_ENDPOINT
    hf_token: SecretStr = SecretStr(COMMON_HF_TOKEN)
    hf_timeout_seconds: Annotated[float, Field(gt=0)] = COMMON_HF_TIMEOUT_SECONDS
    hf_cache_directory: str = COMMON_HF_CACHE_DIRECTORY
    hf_cache_max_bytes: Annotated[int, Field(ge=0)] = COMMON_HF_CACHE_MAX_BYTES
    log_level: LogLevel = COMMON_LOG_LEVEL
    log_format: LogFormat = COMMON_LOG_FORMAT
    # The process registry (common/registry.py): a record lives TTL seconds unless renewed (every TTL/3);
    # metrics URLs name advertise_host, or else the metrics' listen host (this host's name for 0.0.0.0 or ::).
    registry_ttl_seconds: Annotated[float, Field(gt=0, le=3600)] = COMMON_REGISTRY_TTL_SECONDS
    registry_advertise_host: str = COMMON_REGISTRY_ADVERTISE_HOST
    imports: str = ""  # comma-separated modules of your own steps, imported by every process (tasks.app)

    @property
    def import_modules(self) -> list[str]:
        return [name.strip() for name in self.imports.split(",") if name.strip()]

    @property
    def hf_cache_path(self) -> Path:
        """Where the files read from the Hub are cached on this host, shared by every step."""
        if self.hf_cache_directory:
            return Path(self.hf_cache_directory)
        return Path(platformdirs.user_cache_dir()) / "stepcache_hf"


class CacheConfig(_Settings):
    model_config = SettingsConfigDict(env_prefix="CACHE_")

    mongo_database: Annotated[str, Field(min_length=1)] = CACHE_MONGO_DATABASE
    mongo_url: MongoUrl = SecretUrl(CACHE_MONGO_URL)


class QueueConfig(_Settings):
    model_config = SettingsConfigDict(env_prefix="QUEUE_")

    borrow: bool = QUEUE_BORROW
    ledger_lag_seconds: Annotated[float, Field(gt=0, le=60)] = QUEUE_LEDGER_LAG_SECONDS
    max_jobs_per_namespace: Annotated[int, Field(ge=1)] = QUEUE_MAX_JOBS_PER_NAMESPACE
    mongo_database: Annotated[str, Field(min_length=1)] = QUEUE_MONGO_DATABASE
    mongo_url: MongoUrl = SecretUrl(QUEUE_MONGO_URL)
    redis_url: RedisUrl = SecretUrl(QUEUE_REDIS_URL)


class WorkerConfig(_Settings):
    model_config = SettingsConfigDict(env_prefix="WORKER_")

    heartbeat_interval_seconds: Annotated[float, Field(gt=0)] = WORKER_HEARTBEAT_INTERVAL_SECONDS
    max_missing_heartbeats: Annotated[int, Field(ge=1)] = WORKER_MAX_MISSING_HEARTBEATS
    max_job_duration_seconds: Annotated[float, Field(gt=0)] = WORKER_MAX_JOB_DURATION_SECONDS
    content_max_bytes: Annotated[int, Field(ge=1, le=15_000_000)] = WORKER_CONTENT_MAX_BYTES
    max_attempts: Annotated[int, Field(ge=1)] = WORKER_MAX_ATTEMPTS
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = WORKER_METRICS_PORT
    metrics_host: Annotated[str, Field(min_length=1)] = WORKER_METRICS_HOST  # "0.0.0.0": every interface
    hard_limit_grace_seconds: Annotated[float, Field(gt=0)] = WORKER_HARD_LIMIT_GRACE_SECONDS
    parquet_directory: str = WORKER_PARQUET_DIRECTORY
    first_rows_max_bytes: Annotated[int, Field(ge=1000)] = WORKER_FIRST_ROWS_MAX_BYTES
    first_rows_max_columns: Annotated[int, Field(ge=1)] = WORKER_FIRST_ROWS_MAX_COLUMNS
    first_rows_min_cell_bytes: Annotated[int, Field(ge=10)] = WORKER_FIRST_ROWS_MIN_CELL_BYTES
    first_rows_max_rows: Annotated[int, Field(ge=1, le=10_000)] = WORKER_FIRST_ROWS_MAX_ROWS
    first_rows_max_cell_bytes: Annotated[int, Field(ge=10)] = WORKER_FIRST_ROWS_MAX_CELL_BYTES
    parquet_max_bytes: Annotated[int, Field(ge=1)] = WORKER_PARQUET_MAX_BYTES
    # A Parquet row group holds at most these bytes of Arrow data (fewer rows than a batch when cells are big):
    # /rows reads the groups that hold a page's rows
    parquet_row_group_max_bytes: Annotated[int, Field(ge=1_000)] = 8_000_000
    # split-duckdb-index: a split's first rows whose Parquet data fits in duckdb_index_max_bytes are indexed (the
    # index is `partial` past them); the build's DuckDB memory limit and threads
    duckdb_index_max_bytes: Annotated[int, Field(ge=1)] = 5_000_000_000
    duckdb_memory_limit_bytes: Annotated[int, Field(ge=20_000_000)] = 100_000_000
    duckdb_threads: Annotated[int, Field(ge=1, le=64)] = 2
    max_failed_runs: Annotated[int, Field(ge=1)] = WORKER_MAX_FAILED_RUNS
    queued_lease_seconds: Annotated[float, Field(gt=0)] = WORKER_QUEUED_LEASE_SECONDS

    @property
    def parquet_path(self) -> Path:
        """Where config-parquet-and-info writes Parquet files."""
        if self.parquet_directory:
            return Path(self.parquet_directory)
        return Path(platformdirs.user_cache_dir()) / "stepcache_parquet"

    @property
    def lease_ttl_seconds(self) -> float:
        """How long a job keeps its slot without a heartbeat: the tolerated missing heartbeats, plus one."""
        return self.heartbeat_interval_seconds * (self.max_missing_heartbeats + 1)

    @property
    def visibility_timeout_seconds(self) -> float:
        """How long the broker waits before redelivering an unacknowledged message: longer than any job, so
        a running job's message is not handed to a second worker."""
        return max(3600.0, 2 * self.max_job_duration_seconds + self.lease_ttl_seconds)


def _check_secret(value: SecretStr) -> SecretStr:
    if 0 < len(value.get_secret_value()) < MIN_SECRET_LENGTH:
        raise ValueError(f"must be empty (off) or at least {MIN_SECRET_LENGTH} characters")
    return value


Secret = Annotated[SecretStr, AfterValidator(_check_secret)]


def _check_public_url(value: str) -> str:
    parts = urlsplit(value)
    if value and (parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment):
        raise ValueError("must be empty or an http(s):// URL without a query or fragment")
    return value.rstrip("/")


PublicUrl = Annotated[str, AfterValidator(_check_public_url)]
JwtAlgorithm = Literal["EdDSA", "ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]


class ApiConfig(_Settings):
    """The HTTP API (`python -m tasks api`). An empty secret turns its feature off: no operator key and no
    operator secret, no operator endpoint; no webhook secret, no webhook; no JWT public key, no gated or
    private dataset served. The assets' signing key, when empty, is drawn at random when the API starts
    (its URLs then hold for that process only)."""

    model_config = SettingsConfigDict(env_prefix="API_")

    host: str = API_HOST
    port: Annotated[int, Field(ge=0, le=65535)] = API_PORT
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = API_METRICS_PORT
    cors_origins: str = "*"  # comma-separated origins, or "*" (the viewer's); empty: no CORS headers
    max_body_bytes: Annotated[int, Field(ge=1_000, le=100_000_000)] = 1_000_000
    request_timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = 30.0
    # Connections (tasks.api.protocol): a request's line and headers arrive within header_timeout_seconds
    # of its first byte (of the connection's opening, for the first) and weigh at most max_header_bytes;
    # past max_connections open connections, a request is answered 503, and a client's connection past
    # max_connections_per_client is closed at once; an idle keep-alive connection closes after
    # keep_alive_seconds. Only behind trusted_proxies is X-Forwarded-For the client's address.
    header_timeout_seconds: Annotated[float, Field(gt=0, le=600)] = 10.0
    max_header_bytes: Annotated[int, Field(ge=1_024, le=1_048_576)] = 16_384
    max_connections: Annotated[int, Field(ge=1, le=100_000)] = 1_000
    max_connections_per_client: Annotated[int, Field(ge=1, le=100_000)] = 50  # an IPv6 client: its /64
    trusted_proxies: str = ""  # comma-separated addresses or networks whose X-Forwarded-For is believed
    keep_alive_seconds: Annotated[int, Field(ge=1, le=600)] = 5
    # Event streams (tasks.api.jobs): at most events_max_streams open per API process and
    # events_max_streams_per_client per client address (past them: 429 with Retry-After); a stream with no
    # event of its job for events_idle_seconds closes with the job's state, resumable with Last-Event-ID.
    events_max_streams: Annotated[int, Field(ge=1, le=100_000)] = 100
    events_max_streams_per_client: Annotated[int, Field(ge=1, le=10_000)] = 4
    events_idle_seconds: Annotated[float, Field(gt=0, le=86_400)] = 60.0
    cache_max_age_seconds: Annotated[int, Field(ge=0, le=365 * 86400)] = 60
    # /search and /filter (tasks.api.browse): a query's DuckDB time limit, memory limit and threads
    query_timeout_seconds: Annotated[float, Field(gt=0, le=600)] = 10.0
    query_memory_limit_bytes: Annotated[int, Field(ge=20_000_000)] = 100_000_000
    query_threads: Annotated[int, Field(ge=1, le=64)] = 2
    retry_after_seconds: Annotated[int, Field(ge=1, le=3600)] = 5
    backfill_interval_seconds: Annotated[float, Field(gt=0, le=7 * 86400)] = 60.0
    access_cache_seconds: Annotated[float, Field(ge=0, le=86400)] = 60.0
    jwt_algorithm: JwtAlgorithm = "EdDSA"
    jwt_public_key: str = ""
    jwt_audience: Annotated[str, Field(min_length=1)] = "stepcache"
    operator_key: Secret = SecretStr("")
    operator_secret: Secret = SecretStr("")
    signature_window_seconds: Annotated[float, Field(gt=0, le=3600)] = 300.0
    webhook_secret: Secret = SecretStr("")
    assets_signing_key: Secret = SecretStr("")
    assets_url_ttl_seconds: Annotated[int, Field(ge=1, le=365 * 86400)] = 3600
    # The API's public base URL (https://viewer.example.org, or with a path behind a proxy): the absolute URLs
    # it gives out, the Parquet files', start with it; empty: the request's own base URL.
    public_url: PublicUrl = ""

    @field_validator("jwt_public_key")
    @classmethod
    def _check_public_key(cls, value: str, info: ValidationInfo) -> str:
        """A PEM public key of the algorithm's family (newlines may be written `\\n` in one-line variables)."""
        pem = value.replace("\\n", "\n").strip()
        algorithm = info.data.get("jwt_algorithm")
        if pem and algorithm:
            from jwt.algorithms import get_default_algorithms

            try:
                key = get_default_algorithms()[algorithm].prepare_key(pem)
            except Exception as error:
                raise ValueError(f"not a PEM public key for {algorithm}: {error}") from None
            if not callable(getattr(key, "verify", None)):  # a private key: it signs, and must not be here
                raise ValueError(f"a private key, where the public key for {algorithm} goes")
        return pem

    @model_validator(mode="after")
    def _check_workers_share_a_key(self) -> ApiConfig:
        if self.workers > 1 and not self.assets_signing_key.get_secret_value():
            raise ValueError("API_WORKERS > 1 needs API_ASSETS_SIGNING_KEY: every process must sign alike")
        return self

    @property
    def allowed_origins(self) -> list[str]:
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]


class AppConfig(BaseModel):
    """All settings of one process."""

    PREFIXES: ClassVar[dict[str, type[_Settings]]] = {
        "assets": AssetsConfig,
        "common": CommonConfig,
        "cache": CacheConfig,
        "queue": QueueConfig,
        "worker": WorkerConfig,
        "api": ApiConfig,
    }

    assets: AssetsConfig
    common: CommonConfig
    cache: CacheConfig
    queue: QueueConfig
    worker: WorkerConfig
    api: ApiConfig

    @classmethod
    def from_env(cls) -> AppConfig:
        """Read every prefix from the environment and the STEPCACHE_CONFIG file; the first bad value raises
        a one-line ConfigError."""
        sections: dict[str, Any] = {}
        for field, settings_class in cls.PREFIXES.items():
            try:
                sections[field] = settings_class()
            except ValidationError as error:
                raise ConfigError(_one_line(settings_class, error)) from None
        return cls(**sections)


def _one_line(settings_class: type[_Settings], error: ValidationError) -> str:
    first = error.errors(include_url=False)[0]  # its input is only compared, never shown: it may be a secret
    if not first["loc"]:  # a rule between variables: its message names them
        return f"invalid configuration: {first['msg'].removeprefix('Value error, ')}"
    field = "_".join(str(part) for part in first["loc"])
    variable = str(settings_class.model_config.get("env_prefix", "")) + field.upper()
    message = first["msg"].removeprefix("Value error, ")
    info = settings_class.model_fields.get(field)
    secret = info is None or info.annotation is SecretStr  # a URL's is shown with its password masked
    raw = os.environ.get(variable)
    in_file = value_in_file(settings_class, field, AppConfig.PREFIXES) if raw is None else None
    if in_file is not None and in_file[1] == first.get("input"):  # else `.env`'s, which beats the file
        path, value = in_file
        key = f"{section_name(settings_class)}.{field}"
        return f"invalid configuration: {path}: {key}{_shown(variable, value, secret)}: {message}"
    return f"invalid configuration: {variable}{_shown(variable, raw, secret)}: {message}"


def _shown(variable: str, raw: object, secret: bool) -> str:
    """`=value` for the error line: nothing for a secret (or an unknown value), a URL's password masked."""
    if raw is None or (secret and "URL" not in variable) or any(w in variable for w in ("TOKEN", "SECRET", "KEY")):
        return ""
    return f"={mask_url(str(raw)) if 'URL' in variable else raw!r}"


@lru_cache(maxsize=1)
def get_config() -> AppConfig:
    """The process's settings, read once; `get_config.cache_clear()` re-reads the environment and file."""
    return AppConfig.from_env()


def get_config_or_exit() -> AppConfig:
    """The process's settings, or one line on stderr and exit status 2 when a value is bad."""
    try:
        return get_config()
    except ConfigError as error:
        exit_with(str(error))


def exit_with(message: str) -> NoReturn:
    """Stop the process as a bad setting does: one line on stderr, exit status 2."""
    print(f"stepcache: {message}", file=sys.stderr)
    raise SystemExit(2)
