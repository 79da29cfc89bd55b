"""What common.redaction takes out of a message, and what it leaves."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from common.redaction import HOST, redact
from tests.conftest import use_settings


def test_local_paths_become_relative_to_their_root_and_urls_stay(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    use_settings(
        clean_env,
        {"COMMON_HF_ENDPOINT": f"file://{tmp_path}/mirror", "WORKER_PARQUET_DIRECTORY": str(tmp_path / "parquet")},
    )
    parquet = "org/ds/--/r/--/c/s/0000.parquet"
    hub = "https://hub.example/api/datasets/org/ds/tree/main"
    cases = {
        f"The directory at {tmp_path}/mirror/org/empty is empty": "The directory at org/empty is empty",
        f"cannot read file://{tmp_path}/mirror/org/ds/a.csv": "cannot read org/ds/a.csv",
        f"PosixPath('{tmp_path}/parquet/{parquet}')": f"PosixPath('{parquet}')",
        "No such file or directory: '/somewhere/else/train.csv'": "No such file or directory: '.../train.csv'",
        f"404 for {hub}": f"404 for {hub}",
        "org/ds has 1/2 of its rows, and/or a / b": "org/ds has 1/2 of its rows, and/or a / b",
        f"refused by {socket.gethostname()}:6379": f"refused by {HOST}:6379",
    }
    for text, redacted in cases.items():
        assert redact(text) == redacted
