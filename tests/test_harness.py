from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import redis
from pymongo import MongoClient

from tasks.embedded import ROOT
from tests.conftest import Stores


def test_every_test_gets_fresh_databases_named_for_tests(stores: Stores) -> None:
    assert "test" in stores.cache_database and "test" in stores.queue_database
    assert stores.cache_database != stores.queue_database
    client: MongoClient[dict[str, object]] = MongoClient(stores.mongo_url)
    assert client[stores.cache_database].list_collection_names() == []
    client.close()
    assert redis.Redis.from_url(stores.redis_url).dbsize() == 0


def test_a_missing_redis_server_fails_the_run_with_one_line_saying_how_to_install_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("TEST_REDIS_URL", "PATH")}
    env["PATH"] = str(tmp_path)  # a PATH where no redis-server lives
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_harness.py::test_every_test_gets_fresh_databases_named_for_tests",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode != 0
    lines = [line for line in process.stdout.splitlines() if "redis-server" in line]
    assert len(lines) == 1, process.stdout
    assert "apt-get install redis-server" in lines[0]
