"""STEPCACHE_CONFIG: a TOML or YAML file sets the same settings as the environment, a section per prefix;
the environment overrides it; what it holds wrong is one line naming the file and the key; its secrets are
as masked as the environment's."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.config import AppConfig, QueueConfig, get_config
from common.config_file import CONFIG_FILE_VARIABLE, section_name
from common.exceptions import ConfigError
from tasks.embedded import ROOT
from tests.conftest import SETTINGS_PREFIXES, Stores

SECRET = "hunter2-is-a-secret"  # long enough for an API secret: a valid one
TOML = """
[common]
log_level = "DEBUG"
hf_token = "hf_hunter2"

[queue]
max_jobs_per_namespace = 2
ledger_lag_seconds = 0.5
redis_url = "redis://:hunter2@cache.example:6380/1"

[worker]
max_attempts = 5

[api]
operator_key = "hunter2-is-a-secret"
"""
YAML = """
common:
  log_level: DEBUG
  hf_token: hf_hunter2
queue:
  max_jobs_per_namespace: 2
  ledger_lag_seconds: 0.5
  redis_url: "redis://:hunter2@cache.example:6380/1"
worker:
  max_attempts: 5
api:
  operator_key: hunter2-is-a-secret
"""


@pytest.fixture
def settings_file(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Settings]:
    """Writes a settings file and names it in STEPCACHE_CONFIG (none named before)."""
    clean_env.delenv(CONFIG_FILE_VARIABLE, raising=False)
    yield Settings(clean_env, tmp_path)
    get_config.cache_clear()


class Settings:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, directory: Path) -> None:
        self.monkeypatch, self.directory = monkeypatch, directory

    def write(self, text: str, name: str = "stepcache.toml") -> Path:
        path = self.directory / name
        path.write_text(text)
        self.monkeypatch.setenv(CONFIG_FILE_VARIABLE, str(path))
        get_config.cache_clear()
        return path

    def error(self) -> str:
        with pytest.raises(ConfigError) as raised:
            get_config()
        message = str(raised.value)
        assert "\n" not in message
        assert "hunter2" not in message
        return message


@pytest.mark.parametrize(("text", "name"), [(TOML, "stepcache.toml"), (YAML, "stepcache.yaml"), (YAML, "s.yml")])
def test_a_file_sets_the_settings_a_section_per_prefix(settings_file: Settings, text: str, name: str) -> None:
    settings_file.write(text, name)
    config = get_config()
    assert config.common.log_level == "DEBUG"
    assert config.common.hf_token.get_secret_value() == "hf_hunter2"
    assert config.queue.max_jobs_per_namespace == 2
    assert config.queue.ledger_lag_seconds == 0.5
    assert config.queue.redis_url.get_secret_value() == "redis://:hunter2@cache.example:6380/1"
    assert config.worker.max_attempts == 5
    assert config.api.operator_key.get_secret_value() == SECRET
    assert config.queue.mongo_database == "datasets_server_queue"  # not in the file: the default
    assert config.cache == AppConfig.from_env().cache


def test_the_sections_are_the_prefixes_and_their_keys_the_variables_without_it() -> None:
    for name, settings_class in AppConfig.PREFIXES.items():
        assert section_name(settings_class) == name
        assert str(settings_class.model_config.get("env_prefix")) == f"{name.upper()}_"


def test_the_environment_overrides_the_file(settings_file: Settings) -> None:
    settings_file.write(TOML)
    settings_file.monkeypatch.setenv("QUEUE_MAX_JOBS_PER_NAMESPACE", "7")
    settings_file.monkeypatch.setenv("API_OPERATOR_KEY", "from-the-environment-1")
    config = get_config()
    assert config.queue.max_jobs_per_namespace == 7
    assert config.queue.ledger_lag_seconds == 0.5  # the same section's other keys: still the file's
    assert config.api.operator_key.get_secret_value() == "from-the-environment-1"


def test_a_dotenv_file_overrides_the_settings_file_and_arguments_override_both(settings_file: Settings) -> None:
    settings_file.write(TOML)
    (settings_file.directory / ".env").write_text("QUEUE_MAX_JOBS_PER_NAMESPACE=3\n")  # the working directory
    assert get_config().queue.max_jobs_per_namespace == 3
    assert QueueConfig(max_jobs_per_namespace=9).max_jobs_per_namespace == 9


def test_an_empty_file_or_section_sets_nothing(settings_file: Settings) -> None:
    defaults = AppConfig.from_env()
    settings_file.write("", "empty.toml")
    assert get_config() == defaults
    settings_file.write("queue:\ncommon: {}\n", "empty.yaml")
    assert get_config() == defaults
    settings_file.monkeypatch.setenv(CONFIG_FILE_VARIABLE, "")  # set but empty: no file
    get_config.cache_clear()
    assert get_config() == defaults


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("[queue]\nmax_jobs_per_namespac = 2\n", "stepcache.toml"),
        ("queue:\n  max_jobs_per_namespac: 2\n", "stepcache.yaml"),
    ],
)
def test_an_unknown_key_is_one_line_naming_the_file_the_key_and_the_keys_accepted(
    settings_file: Settings, text: str, name: str
) -> None:
    path = settings_file.write(text, name)
    assert settings_file.error() == (
        f"invalid configuration: {path}: queue.max_jobs_per_namespac: not a setting (did you mean "
        "max_jobs_per_namespace?); queue takes borrow, ledger_lag_seconds, max_jobs_per_namespace, "
        "mongo_database, mongo_url, redis_url"
    )


def test_a_variable_s_name_is_not_a_key(settings_file: Settings) -> None:
    settings_file.write("[queue]\nQUEUE_MAX_JOBS_PER_NAMESPACE = 2\n")
    assert "queue.QUEUE_MAX_JOBS_PER_NAMESPACE: not a setting" in settings_file.error()


@pytest.mark.parametrize(
    ("text", "name", "expected"),
    [
        ("[celery]\nbroker_url = 'redis://x'\n", "s.toml", "celery: not a section"),
        ("queues:\n  x: 1\n", "s.yaml", "queues: not a section (did you mean queue?)"),
    ],
)
def test_an_unknown_section_is_one_line_naming_the_sections(
    settings_file: Settings, text: str, name: str, expected: str
) -> None:
    path = settings_file.write(text, name)
    sections = ", ".join(AppConfig.PREFIXES)
    assert settings_file.error() == f"invalid configuration: {path}: {expected}; the sections are {sections}"


@pytest.mark.parametrize(
    ("text", "name", "expected"),
    [
        ("queue = 2\n", "s.toml", "queue: must be a TOML table of settings"),
        ("queue: [1, 2]\n", "s.yaml", "queue: must be a YAML mapping of settings"),
        ("- queue\n", "s.yaml", f"must be a YAML mapping of sections ({', '.join(AppConfig.PREFIXES)})"),
    ],
)
def test_a_section_that_holds_no_settings_is_refused(
    settings_file: Settings, text: str, name: str, expected: str
) -> None:
    path = settings_file.write(text, name)
    assert settings_file.error() == f"invalid configuration: {path}: {expected}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "[queue]\nmax_jobs_per_namespace = 0\n",
            "queue.max_jobs_per_namespace=0: Input should be greater than or equal to 1",
        ),
        (
            "[queue]\nmax_jobs_per_namespace = 'many'\n",
            "queue.max_jobs_per_namespace='many': Input should be a valid integer",
        ),
        (
            "[common]\nlog_level = 'LOUD'\n",
            "common.log_level='LOUD': Input should be 'DEBUG', 'INFO', 'WARNING', 'ERROR' or 'CRITICAL'",
        ),
        ("[worker]\nmetrics_port = 70000\n", "worker.metrics_port=70000: Input should be less than or equal to 65535"),
        (
            "[queue]\nredis_url = 'mongodb://admin:hunter2@db:27017'\n",
            "queue.redis_url='mongodb://admin:***@db:27017': must be a URL starting with redis://",
        ),
        ("[cache]\nmongo_url = 27017\n", "cache.mongo_url='27017': Input should be a valid string"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_file_the_key_and_what_it_accepts(
    settings_file: Settings, text: str, expected: str
) -> None:
    path = settings_file.write(text)
    assert settings_file.error().startswith(f"invalid configuration: {path}: {expected}")


def test_a_bad_value_in_the_environment_is_named_as_its_variable_even_with_a_file(settings_file: Settings) -> None:
    settings_file.write("[queue]\nmax_jobs_per_namespace = 0\n")
    settings_file.monkeypatch.setenv("QUEUE_MAX_JOBS_PER_NAMESPACE", "-1")  # the value used: the environment's
    assert settings_file.error().startswith("invalid configuration: QUEUE_MAX_JOBS_PER_NAMESPACE='-1': ")


def test_a_bad_value_in_a_dotenv_file_is_named_as_its_variable_even_with_a_file(settings_file: Settings) -> None:
    settings_file.write("[queue]\nmax_jobs_per_namespace = 2\n")
    (settings_file.directory / ".env").write_text("QUEUE_MAX_JOBS_PER_NAMESPACE=0\n")
    assert settings_file.error().startswith("invalid configuration: QUEUE_MAX_JOBS_PER_NAMESPACE: ")


@pytest.mark.parametrize("suffix", [".ini", ".json", ""])
def test_a_file_of_another_format_is_one_line(settings_file: Settings, suffix: str) -> None:
    path = settings_file.write("[queue]\n", f"stepcache{suffix}")
    message = settings_file.error()
    assert message == f"invalid configuration: STEPCACHE_CONFIG={path}: not a .toml, .yaml or .yml file"


def test_a_missing_file_is_one_line(settings_file: Settings) -> None:
    settings_file.monkeypatch.setenv(CONFIG_FILE_VARIABLE, "/no/such/stepcache.toml")
    assert settings_file.error() == "invalid configuration: STEPCACHE_CONFIG=/no/such/stepcache.toml: no such file"


@pytest.mark.parametrize(
    ("text", "name", "expected"),
    [
        (
            '[api]\noperator_key = "hunter2-is-a-secret\n',
            "s.toml",
            "not valid TOML: Illegal character '\\n' (at line 2",
        ),
        (
            "api:\n  operator_key: 'hunter2-is-a-secret\n",
            "s.yaml",
            "not valid YAML: found unexpected end of stream (line 3",
        ),
        ("api:\n  operator_key: hunter2: x\n", "s.yaml", "not valid YAML: mapping values are not allowed here (line 2"),
    ],
)
def test_a_file_that_does_not_parse_is_one_line_that_quotes_none_of_it(
    settings_file: Settings, text: str, name: str, expected: str
) -> None:
    path = settings_file.write(text, name)
    assert settings_file.error().startswith(f"invalid configuration: {path}: {expected}")


@pytest.mark.parametrize(("text", "name"), [(TOML, "stepcache.toml"), (YAML, "stepcache.yaml")])
def test_secrets_from_the_file_are_masked_as_those_from_the_environment(
    settings_file: Settings, text: str, name: str
) -> None:
    settings_file.write(text, name)
    config = get_config()
    for shown in (
        repr(config),
        str(config),
        config.model_dump_json(),
        str(config.model_dump(mode="json")),
        f"{config.queue.redis_url} {config.common.hf_token} {config.api.operator_key}",
    ):
        assert "hunter2" not in shown
    assert "redis://:***@cache.example:6380/1" in repr(config)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[api]\noperator_key = 'hunter2'\n", "api.operator_key"),  # too short to be a secret
        ("[api]\nwebhook_secret = 'hunter2'\n", "api.webhook_secret"),
        ("[api]\nassets_signing_key = 'hunter2'\n", "api.assets_signing_key"),
        ("[common]\nhf_token = 2\n", "common.hf_token"),  # not a string
    ],
)
def test_a_bad_secret_in_the_file_is_named_never_shown(settings_file: Settings, text: str, key: str) -> None:
    path = settings_file.write(text)
    assert settings_file.error().startswith(f"invalid configuration: {path}: {key}: ")


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tasks", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def test_the_cli_takes_its_settings_from_the_file_and_stops_on_a_bad_one(stores: Stores, tmp_path: Path) -> None:
    """A real process: `python -m tasks limits` reads QUEUE_ settings (and the stores) from the file."""
    lines = ["[queue]", "max_jobs_per_namespace = 4"]
    lines += [
        f"{name.removeprefix('QUEUE_').lower()} = '{value}'"
        for name, value in stores.env().items()
        if name.startswith("QUEUE_")
    ]
    lines += ["[cache]"]
    lines += [
        f"{name.removeprefix('CACHE_').lower()} = '{value}'"
        for name, value in stores.env().items()
        if name.startswith("CACHE_")
    ]
    path = tmp_path / "stepcache.toml"
    path.write_text("\n".join(lines) + "\n")
    env = {name: value for name, value in os.environ.items() if not name.startswith(SETTINGS_PREFIXES)}
    env[CONFIG_FILE_VARIABLE] = str(path)

    shown = _cli(env, "limits")
    assert shown.returncode == 0, shown.stderr
    assert "default (QUEUE_MAX_JOBS_PER_NAMESPACE): 4" in shown.stdout

    overridden = _cli({**env, "QUEUE_MAX_JOBS_PER_NAMESPACE": "6"}, "limits")
    assert overridden.returncode == 0, overridden.stderr
    assert "default (QUEUE_MAX_JOBS_PER_NAMESPACE): 6" in overridden.stdout

    path.write_text(path.read_text() + "[api]\noperator_secret = 'hunter2'\n")
    refused = _cli(env, "limits")
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [
        f"stepcache: invalid configuration: {path}: api.operator_secret: must be empty (off) or at least 16 characters"
    ]
    assert "hunter2" not in refused.stdout + refused.stderr
