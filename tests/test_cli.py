"""The command line's errors, as a user meets them: `python -m tasks ...` in a real process against the
test's servers. Each is one line on stderr, without a traceback, with the documented exit code (2 bad
input, 3 a server could not be reached), and a closed output stops a command quietly (141)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tasks.embedded import free_port
from tasks.reachability import REACH_TIMEOUT_SECONDS
from tests.conftest import Stores

EXIT_BAD_INPUT, EXIT_UNREACHABLE, EXIT_STDOUT_CLOSED = 2, 3, 141


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m tasks args` with this process's settings (the test's servers), and `env` over them."""
    return subprocess.run(
        [sys.executable, "-m", "tasks", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_one_line_error(process: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    lines = process.stderr.splitlines()
    assert len(lines) == 1, process.stderr
    assert lines[0].startswith("stepcache: ") and "Traceback" not in process.stderr
    assert process.returncode == code, (process.returncode, process.stderr)
    for word in words:
        assert word in lines[0], (word, lines[0])


BAD_ARGUMENTS = [  # (the arguments, words the error line says)
    (["limits", "set", "demo", "-1"], ["value", "0 or more", "'-1'"]),
    (["limits", "set", "demo", "two"], ["value", "'two'"]),
    (["limits", "set", "demo"], ["both are needed"]),
    (["limits", "set", "../up", "3"], ["Invalid dataset name"]),
    (["limits", "set", "demo", "--weight", "0"], ["weight", "more than 0", "'0'"]),
    (["limits", "set", "demo", "--weight", "heavy"], ["weight", "'heavy'"]),
    (["limits", "set", "demo", "--ceiling", "-2"], ["ceiling", "0 or more", "'-2'"]),
    (["enqueue", "dataset-config-names", "demo/csv", "--priority", "urgent"], ["priority", "'urgent'"]),
    (["enqueue", "no-such-step", "demo/csv"], ["unknown processing step"]),
    (["enqueue", "dataset-config-names", "demo/csv", "--config", "../etc"], ["config"]),
    (["status", "org/../x"], ["Invalid dataset name"]),
    (["backfill", "bad--name"], ["Invalid dataset name"]),
    (["cancel", "a/b/c"], ["Invalid dataset name"]),
    (["follow", "no-such-job"], ["no-such-job"]),
    (["top", "--limit", "0"], ["--limit", "1 or more"]),
    (["top", "--interval", "soon"], ["--interval", "'soon'"]),
    (["top", "--sort", "size"], ["--sort", "invalid choice"]),
    (["api", "--port", "70000"], ["--port", "65535"]),
    (["api", "--workers", "0"], ["--workers"]),
    (["run", "--flower-port", "-5"], ["--flower-port"]),
    (["no-such-command"], ["invalid choice"]),
    ([], ["COMMAND"]),
]


@pytest.mark.parametrize(("args", "words"), BAD_ARGUMENTS, ids=[" ".join(args) or "-" for args, _ in BAD_ARGUMENTS])
def test_a_bad_argument_is_one_line_and_exit_2(stores: Stores, args: list[str], words: list[str]) -> None:
    assert_one_line_error(cli(*args), EXIT_BAD_INPUT, *words)


def test_a_refused_limit_changes_nothing(stores: Stores) -> None:
    assert_one_line_error(cli("limits", "set", "demo", "-1"), EXIT_BAD_INPUT)
    shown = cli("limits")
    assert shown.returncode == 0 and "demo" not in shown.stdout


def test_a_closed_output_stops_the_command_quietly_with_141(stores: Stores) -> None:
    for args in (["status", "demo/csv"], ["limits"], ["top", "--once"]):
        process = subprocess.Popen(
            [sys.executable, "-m", "tasks", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert process.stdout is not None and process.stderr is not None
        process.stdout.close()  # `| head` that read what it wanted, before the command wrote anything
        errors = process.stderr.read()
        assert process.wait(timeout=120) == EXIT_STDOUT_CLOSED, (args, errors)
        assert errors == "", args


def test_a_redis_that_refuses_connections_is_one_line_and_exit_3_at_once(stores: Stores) -> None:
    started = time.monotonic()
    process = cli("status", "demo/csv", QUEUE_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    assert_one_line_error(process, EXIT_UNREACHABLE, "Redis at redis://127.0.0.1:", "could not be reached")
    assert time.monotonic() - started < REACH_TIMEOUT_SECONDS + 10


def test_an_unreachable_mongodb_is_one_line_and_exit_3_within_the_reach_timeout(stores: Stores) -> None:
    down = f"mongodb://user:hunter22@127.0.0.1:{free_port()}"
    started = time.monotonic()
    process = cli("cache-counts", CACHE_MONGO_URL=down, QUEUE_MONGO_URL=down)
    assert_one_line_error(process, EXIT_UNREACHABLE, "MongoDB at mongodb://user:***@127.0.0.1:")
    assert "hunter22" not in process.stderr
    assert time.monotonic() - started < REACH_TIMEOUT_SECONDS + 10  # pymongo alone: about a minute


def test_an_unreachable_broker_is_one_line_and_exit_3_before_anything_is_enqueued(stores: Stores) -> None:
    process = cli("enqueue", "dataset-config-names", "demo/csv", CELERY_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0")
    assert_one_line_error(process, EXIT_UNREACHABLE, "the broker at redis://127.0.0.1:")
    assert cli("limits").stdout.count("demo") == 0  # nothing was admitted


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that accepts connections and never answers (a stalled server)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


def test_a_redis_that_never_answers_is_one_line_and_exit_3_within_the_reach_timeout(
    stores: Stores, silent_server: int
) -> None:
    started = time.monotonic()
    process = cli("top", "--once", QUEUE_REDIS_URL=f"redis://127.0.0.1:{silent_server}/0")
    assert_one_line_error(process, EXIT_UNREACHABLE, "Redis at", f"did not answer within {REACH_TIMEOUT_SECONDS:g} s")
    assert time.monotonic() - started < REACH_TIMEOUT_SECONDS + 10
