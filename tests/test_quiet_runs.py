"""A clean run says nothing alarming: a new Redis is initialized with an INFO line (the warning is for a
Redis that lost what the ledger knows of), and a process that used a Redis Cluster exits without a
traceback after the cluster is gone (as a test session does: its cluster stops before the interpreter)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Sequence

import pytest

from common.config import get_config
from common.queue import Dispatch, Queue
from common.queue.ledger import Ledger
from common.queue.limiter import NamespaceLimiter
from common.redis_connection import get_redis
from tasks.embedded import ROOT
from tests.conftest import Stores
from tests.redis_servers import start_cluster

QUEUE_LOGGER = "common.queue.queue"


class NoDispatch:
    def publish(self, dispatch: Dispatch) -> None:
        pass

    def revoke(self, job_ids: Sequence[str]) -> None:
        pass


def new_queue() -> Queue:
    settings = get_config()
    limiter = NamespaceLimiter(
        get_redis(settings.queue.redis_url),
        default_limit=2,
        started_ttl_seconds=60,
        queued_ttl_seconds=3600,
        max_attempts=2,
    )
    return Queue(NoDispatch(), Ledger(), limiter)


def queue_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == QUEUE_LOGGER]


def test_a_new_redis_is_initialized_with_an_info_line_and_no_warning(
    stores: Stores, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=QUEUE_LOGGER)
    new_queue().enqueue("dataset-config-names", "org/ds")
    records = queue_records(caplog)
    assert [record.levelno for record in records] == [logging.INFO]
    assert records[0].getMessage() == "Redis initialized: a new Redis (the ledger has no job for it)"


def test_a_redis_that_lost_its_data_is_still_a_warning(stores: Stores, caplog: pytest.LogCaptureFixture) -> None:
    queue = new_queue()
    queue.enqueue("dataset-config-names", "org/ds")
    queue.jobs()  # the ledger has it
    client = stores.redis()
    client.flushdb()  # Redis restarted without persistence
    client.close()
    caplog.clear()
    caplog.set_level(logging.INFO, logger=QUEUE_LOGGER)
    queue.enqueue("dataset-config-names", "org/other")
    warnings = [record for record in queue_records(caplog) if record.levelno == logging.WARNING]
    assert [record.getMessage() for record in warnings] == [
        "Redis lost its data or rolled back: 1 jobs took the ledger's state"
    ]


# Journals noted and not written yet (a long lag), log handlers on a stream closed before the interpreter
# exits (as a test runner's capture is), and the cluster stopped meanwhile.
USES_A_CLUSTER = textwrap.dedent(
    """
    import logging, sys, time
    from common.config import get_config
    from common.queue import Queue
    from common.queue.ledger import Ledger
    from common.queue.limiter import NamespaceLimiter
    from common.redis_connection import get_redis

    class NoDispatch:
        def publish(self, dispatch): pass
        def revoke(self, job_ids): pass

    stream = open(sys.argv[1], "w")
    logging.basicConfig(stream=stream, level=logging.INFO)
    client = get_redis(get_config().queue.redis_url)
    for _ in range(2):
        limiter = NamespaceLimiter(client, 2, started_ttl_seconds=60, queued_ttl_seconds=3600, max_attempts=2)
        Queue(NoDispatch(), Ledger(), limiter).enqueue("dataset-config-names", "org/ds")
    print("enqueued", flush=True)
    sys.stdin.readline()  # the cluster is gone
    time.sleep(1.5)  # past the cluster client's least interval between two topology refreshes
    stream.close()
    """
)


def test_a_process_exits_without_a_logging_error_after_its_cluster_is_gone(
    stores: Stores, tmp_path: os.PathLike[str]
) -> None:
    cluster = start_cluster()
    try:
        env = {**os.environ, "QUEUE_REDIS_URL": cluster.url, "QUEUE_LEDGER_LAG_SECONDS": "60"}
        process = subprocess.Popen(
            [sys.executable, "-c", USES_A_CLUSTER, str(os.path.join(tmp_path, "log"))],
            env=env,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None
        if process.stdout.readline() != "enqueued\n":
            pytest.fail(process.communicate(timeout=60)[1])
    finally:
        cluster.stop()
    _, errors = process.communicate("go\n", timeout=60)
    assert process.returncode == 0, errors
    assert "Logging error" not in errors and "Traceback" not in errors, errors
    assert errors == ""
