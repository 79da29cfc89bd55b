from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import platformdirs
import pytest

from common.config import get_config
from common.exceptions import ConfigError
from common.logging import configure_logging

DEFAULTS = {
    "ASSETS_BASE_URL": ("assets", lambda c: c.assets.base_url),
    "ASSETS_STORAGE_DIRECTORY": ("", lambda c: c.assets.storage_directory),
    "COMMON_HF_ENDPOINT": ("https://huggingface.co", lambda c: c.common.hf_endpoint),
    "COMMON_HF_TOKEN": ("", lambda c: c.common.hf_token.get_secret_value()),
    "COMMON_LOG_LEVEL": ("INFO", lambda c: c.common.log_level),
    "CACHE_MONGO_DATABASE": ("datasets_server_cache", lambda c: c.cache.mongo_database),
    "CACHE_MONGO_URL": ("mongodb://localhost:27017", lambda c: c.cache.mongo_url.get_secret_value()),
    "QUEUE_MAX_JOBS_PER_NAMESPACE": (1, lambda c: c.queue.max_jobs_per_namespace),
    "QUEUE_MONGO_DATABASE": ("datasets_server_queue", lambda c: c.queue.mongo_database),
    "QUEUE_MONGO_URL": ("mongodb://localhost:27017", lambda c: c.queue.mongo_url.get_secret_value()),
    "QUEUE_REDIS_URL": ("redis://localhost:6379/0", lambda c: c.queue.redis_url.get_secret_value()),
    "WORKER_HEARTBEAT_INTERVAL_SECONDS": (10.0, lambda c: c.worker.heartbeat_interval_seconds),
    "WORKER_MAX_MISSING_HEARTBEATS": (3, lambda c: c.worker.max_missing_heartbeats),
    "WORKER_MAX_JOB_DURATION_SECONDS": (1200.0, lambda c: c.worker.max_job_duration_seconds),
    "WORKER_CONTENT_MAX_BYTES": (10_000_000, lambda c: c.worker.content_max_bytes),
    "WORKER_MAX_ATTEMPTS": (3, lambda c: c.worker.max_attempts),
    "WORKER_METRICS_PORT": (9808, lambda c: c.worker.metrics_port),
    "WORKER_METRICS_HOST": ("127.0.0.1", lambda c: c.worker.metrics_host),
    "WORKER_HARD_LIMIT_GRACE_SECONDS": (30.0, lambda c: c.worker.hard_limit_grace_seconds),
    "COMMON_LOG_FORMAT": ("plain", lambda c: c.common.log_format),
    "WORKER_PARQUET_DIRECTORY": ("", lambda c: c.worker.parquet_directory),
    "WORKER_FIRST_ROWS_MAX_BYTES": (1_000_000, lambda c: c.worker.first_rows_max_bytes),
    "WORKER_FIRST_ROWS_MAX_COLUMNS": (1000, lambda c: c.worker.first_rows_max_columns),
    "WORKER_FIRST_ROWS_MIN_CELL_BYTES": (100, lambda c: c.worker.first_rows_min_cell_bytes),
    "WORKER_MAX_FAILED_RUNS": (3, lambda c: c.worker.max_failed_runs),
    "WORKER_QUEUED_LEASE_SECONDS": (300.0, lambda c: c.worker.queued_lease_seconds),
    "API_PORT": (8000, lambda c: c.api.port),
    "API_JWT_ALGORITHM": ("EdDSA", lambda c: c.api.jwt_algorithm),
    "API_RETRY_AFTER_SECONDS": (5, lambda c: c.api.retry_after_seconds),
    "API_MAX_BODY_BYTES": (1_000_000, lambda c: c.api.max_body_bytes),
}

BAD_VALUES = [
    ("ASSETS_BASE_URL", None),  # any string is a base URL
    ("ASSETS_STORAGE_DIRECTORY", None),  # any string is a directory
    ("COMMON_HF_ENDPOINT", "ftp://hub.example"),
    ("COMMON_HF_TOKEN", None),
    ("COMMON_LOG_LEVEL", "LOUD"),
    ("CACHE_MONGO_DATABASE", ""),
    ("CACHE_MONGO_URL", "http://user:hunter2@db.example:27017"),
    ("QUEUE_MAX_JOBS_PER_NAMESPACE", "0"),
    ("QUEUE_MAX_JOBS_PER_NAMESPACE", "abc"),
    ("QUEUE_MONGO_DATABASE", ""),
    ("QUEUE_MONGO_URL", "redis://localhost:6379"),
    ("QUEUE_REDIS_URL", "mongodb://admin:hunter2@localhost:27017"),
    ("WORKER_HEARTBEAT_INTERVAL_SECONDS", "0"),
    ("WORKER_MAX_MISSING_HEARTBEATS", "-1"),
    ("WORKER_MAX_JOB_DURATION_SECONDS", "soon"),
    ("WORKER_CONTENT_MAX_BYTES", "20000000"),
    ("WORKER_MAX_ATTEMPTS", "0"),
    ("WORKER_METRICS_PORT", "70000"),
    ("WORKER_METRICS_HOST", ""),
    ("WORKER_HARD_LIMIT_GRACE_SECONDS", "-5"),
    ("COMMON_LOG_FORMAT", "xml"),
    ("WORKER_FIRST_ROWS_MAX_BYTES", "10"),
    ("WORKER_FIRST_ROWS_MAX_COLUMNS", "0"),
    ("WORKER_FIRST_ROWS_MIN_CELL_BYTES", "x"),
    ("WORKER_MAX_FAILED_RUNS", "0"),
    ("WORKER_QUEUED_LEASE_SECONDS", "0"),
    ("API_PORT", "-1"),
    ("API_JWT_ALGORITHM", "HS256"),  # a shared-secret algorithm: the public key would sign tokens
    ("API_JWT_ALGORITHM", "none"),
    ("API_JWT_PUBLIC_KEY", "hunter2 is not a key"),
    ("API_OPERATOR_KEY", "hunter2"),  # too short to be a secret
    ("API_OPERATOR_SECRET", "hunter2"),
    ("API_WEBHOOK_SECRET", "hunter2"),
    ("API_ASSETS_SIGNING_KEY", "hunter2"),
    ("API_MAX_BODY_BYTES", "10"),
    ("API_REQUEST_TIMEOUT_SECONDS", "0"),
    ("API_RETRY_AFTER_SECONDS", "0"),
]


@pytest.mark.parametrize("variable", DEFAULTS)
def test_every_variable_has_its_documented_default(clean_env: pytest.MonkeyPatch, variable: str) -> None:
    expected, read = DEFAULTS[variable]
    assert read(get_config()) == expected


@pytest.mark.parametrize("variable", DEFAULTS)
def test_every_variable_is_read_from_the_environment(clean_env: pytest.MonkeyPatch, variable: str) -> None:
    values = {
        "COMMON_HF_ENDPOINT": "http://hub.local",
        "COMMON_LOG_LEVEL": "DEBUG",
        "CACHE_MONGO_URL": "mongodb://db:1",
        "QUEUE_MONGO_URL": "mongodb+srv://cluster.example",
        "QUEUE_REDIS_URL": "rediss://cache:6380/2",
        "COMMON_LOG_FORMAT": "json",
        "WORKER_FIRST_ROWS_MAX_BYTES": "5000",
        "WORKER_FIRST_ROWS_MIN_CELL_BYTES": "50",
        "API_JWT_ALGORITHM": "ES256",
        "API_MAX_BODY_BYTES": "5000",
    }
    expected_default, read = DEFAULTS[variable]
    raw = values.get(variable, "7" if not isinstance(expected_default, str) else "something-else")
    clean_env.setenv(variable, raw)
    value = read(get_config())
    assert str(value) == raw or value == type(expected_default)(raw)


@pytest.mark.parametrize(("variable", "value"), [(v, x) for v, x in BAD_VALUES if x is not None])
def test_a_bad_value_is_one_line_naming_the_variable(clean_env: pytest.MonkeyPatch, variable: str, value: str) -> None:
    clean_env.setenv(variable, value)
    with pytest.raises(ConfigError) as raised:
        get_config()
    message = str(raised.value)
    assert "\n" not in message
    assert variable in message
    assert "hunter2" not in message


def test_a_bad_value_stops_the_process_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QUEUE_", "CACHE_", "COMMON_"))}
    env["QUEUE_MAX_JOBS_PER_NAMESPACE"] = "abc"
    process = subprocess.run(
        [sys.executable, "-c", "from common.config import get_config_or_exit; get_config_or_exit()"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert process.returncode == 2
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1, process.stderr
    assert "QUEUE_MAX_JOBS_PER_NAMESPACE" in lines[0]
    assert "integer" in lines[0]
    assert "Traceback" not in process.stderr


def test_the_log_level_names_what_it_accepts(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("COMMON_LOG_LEVEL", "LOUD")
    with pytest.raises(
        ConfigError,
        match=r"COMMON_LOG_LEVEL='LOUD'.*'DEBUG', 'INFO', 'WARNING', 'ERROR' or 'CRITICAL'",
    ):
        get_config()


def test_a_url_of_the_wrong_scheme_names_the_schemes_accepted(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("QUEUE_REDIS_URL", "http://localhost:6379")
    with pytest.raises(ConfigError, match=r"QUEUE_REDIS_URL.*redis://"):
        get_config()


def test_passwords_in_urls_and_the_token_never_show_in_a_repr(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("CACHE_MONGO_URL", "mongodb://admin:hunter2@db.example:27017/x")
    clean_env.setenv("QUEUE_MONGO_URL", "mongodb://admin:hunter2@db.example:27017/x")
    clean_env.setenv("QUEUE_REDIS_URL", "redis://:hunter2@cache.example:6379/0")
    clean_env.setenv("COMMON_HF_TOKEN", "hf_hunter2")
    config = get_config()
    for shown in (repr(config), str(config), str(config.cache.mongo_url), f"{config.queue.redis_url}"):
        assert "hunter2" not in shown
    assert "admin:***@db.example:27017" in repr(config)
    assert config.cache.mongo_url.get_secret_value() == "mongodb://admin:hunter2@db.example:27017/x"
    assert config.common.hf_token.get_secret_value() == "hf_hunter2"


def test_passwords_in_urls_never_show_in_a_log_line(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("INFO", "json")
    logging.getLogger("test").info("connecting to %s", "redis://:hunter2@cache.example:6379/0")
    assert "hunter2" not in capsys.readouterr().err


def test_the_assets_directory_defaults_to_the_os_cache_directory(clean_env: pytest.MonkeyPatch) -> None:
    expected = Path(platformdirs.user_cache_dir()) / "datasets_server_assets"
    assert get_config().assets.storage_path == expected
    clean_env.setenv("ASSETS_STORAGE_DIRECTORY", "/srv/assets")
    get_config.cache_clear()
    assert get_config().assets.storage_path == Path("/srv/assets")


def test_the_lease_outlives_the_tolerated_missing_heartbeats(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("WORKER_HEARTBEAT_INTERVAL_SECONDS", "2")
    clean_env.setenv("WORKER_MAX_MISSING_HEARTBEATS", "3")
    assert get_config().worker.lease_ttl_seconds == 8


def test_an_api_private_key_where_the_public_key_goes_is_refused(clean_env: pytest.MonkeyPatch) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    clean_env.setenv("API_JWT_PUBLIC_KEY", private.decode())
    with pytest.raises(ConfigError, match="a private key"):
        get_config()
    clean_env.delenv("API_JWT_PUBLIC_KEY")
    clean_env.setenv("API_WORKERS", "2")  # processes that sign asset URLs must share a key
    with pytest.raises(ConfigError, match="API_ASSETS_SIGNING_KEY"):
        get_config()
