"""stepcache beyond one Redis: a Redis Cluster holds the limiter, the leases and the events (Celery's broker
stays on one Redis), or a Sentinel-managed Redis holds everything. The queue's, the lifecycle's, the
event bus's and top's own suites also run on the cluster (modules marked `redis_topologies`); here are
the URL forms, what only a cluster has (a master failing over alone, scripts it never saw), and real
workers end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from redis.cluster import RedisCluster

from celeryconfig import celery_settings
from common.config import AppConfig, QueueConfig, get_config
from common.event_bus import EventBus
from common.exceptions import ConfigError
from common.processing_graph import get_processing_graph
from common.queue import JobStatus
from common.queue.limiter import namespace_key, namespace_keys
from common.queue.queue import epoch_keys, epoch_markers
from common.redis_cluster import ScriptBatch
from common.redis_connection import Topology, parse_redis_url
from tasks import samples, steps
from tasks.embedded import ROOT
from tasks.queue import get_queue
from tests.conftest import CLUSTER, SENTINEL, SINGLE, Stores, current_app_for, use_settings
from tests.test_pipeline import wait_until_settled
from tests.test_queue import make_queue
from tests.waiting import eventually
from tests.workers import sample_worker

ROOT_STEP = "dataset-config-names"
on_the_cluster = pytest.mark.parametrize("redis_topology", [CLUSTER], indirect=True)


def test_each_topology_has_its_url_form() -> None:
    assert parse_redis_url("redis://localhost:6379/0").topology == Topology.SINGLE
    cluster = parse_redis_url("redis+cluster://:s3cret@10.0.0.1:7000,10.0.0.2:7001")
    assert (cluster.topology, cluster.hosts, cluster.db) == (
        Topology.CLUSTER,
        (("10.0.0.1", 7000), ("10.0.0.2", 7001)),
        0,
    )
    assert cluster.password == "s3cret" and "s3cret" not in repr(cluster)
    sentinel = parse_redis_url("redis+sentinel://:pw@s1:26379,s2:26379/mymaster/2")
    assert (sentinel.topology, sentinel.hosts, sentinel.service, sentinel.db, sentinel.password) == (
        Topology.SENTINEL,
        (("s1", 26379), ("s2", 26379)),
        "mymaster",
        2,
        "pw",
    )


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+cluster://node-a", "comma-separated list of host:port"),
        ("redis+cluster://a:7000/3", "database 0 only"),
        ("redis+sentinel://s1:26379", "must name the Sentinels' service"),
        ("redis+sentinel://s1:26379/mymaster/x", "must be a number"),
        ("sentinel://s1:26379", "redis+sentinel://"),
    ],
)
def test_a_bad_redis_url_stops_the_process_with_one_line(clean_env: pytest.MonkeyPatch, url: str, says: str) -> None:
    clean_env.setenv("QUEUE_REDIS_URL", url)
    with pytest.raises(ConfigError) as error:
        get_config()
    assert "\n" not in str(error.value) and str(error.value).startswith("invalid configuration: QUEUE_REDIS_URL=")
    assert says in str(error.value)


def test_a_password_in_a_cluster_or_sentinel_url_is_masked(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("QUEUE_REDIS_URL", "redis+cluster://:hunter2@a:7000,b:7001")
    config = get_config()
    assert "hunter2" not in repr(config) and "redis+cluster://:***@a:7000,b:7001" in repr(config)


def test_a_sentinel_url_gives_celery_kombus_sentinel_urls_and_the_masters_name(clean_env: pytest.MonkeyPatch) -> None:
    settings = AppConfig.from_env()
    url = "redis+sentinel://:p%40ss@s1:26379,s2:26380/mymaster/2"
    conf = celery_settings(settings.model_copy(update={"queue": QueueConfig(redis_url=url)}))
    expected = "sentinel://:p%40ss@s1:26379/2;sentinel://:p%40ss@s2:26380/2"
    assert conf["broker_url"] == conf["result_backend"] == expected
    assert conf["broker_transport_options"]["master_name"] == "mymaster"
    assert conf["result_backend_transport_options"]["master_name"] == "mymaster"
    assert conf["broker_transport_options"]["visibility_timeout"] == settings.worker.visibility_timeout_seconds


def test_a_cluster_needs_its_own_broker_and_a_worker_says_so_in_one_line(clean_env: pytest.MonkeyPatch) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CELERY_BROKER_URL"}
    env["QUEUE_REDIS_URL"] = "redis+cluster://:hunter2@127.0.0.1:7000"
    process = subprocess.run(
        [sys.executable, "-c", "import tasks"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert process.returncode == 2 and process.stderr.count("\n") == 1, process.stderr
    assert "QUEUE_REDIS_URL=redis+cluster://:***@127.0.0.1:7000" in process.stderr
    assert "set CELERY_BROKER_URL" in process.stderr and "hunter2" not in process.stderr
    settings = AppConfig.from_env()
    clean_env.setenv("CELERY_BROKER_URL", "redis://broker:6379/0")
    conf = celery_settings(settings.model_copy(update={"queue": QueueConfig(redis_url=env["QUEUE_REDIS_URL"])}))
    assert conf["broker_url"] == conf["result_backend"] == "redis://broker:6379/0"


# --- on a real cluster of three masters ---------------------------------------------------------------------


def _node_names(client: Any, keys: list[str]) -> set[str]:
    return {client.get_node_from_key(key).name for key in keys}


@on_the_cluster
def test_each_master_holds_an_epoch_marker_and_one_master_that_lost_its_data_is_repaired(stores: Stores) -> None:
    q, dispatcher = make_queue(limit=1)
    client = stores.redis()
    assert isinstance(client, RedisCluster)
    markers = epoch_markers(client)
    assert len(markers) == 3 and len(_node_names(client, markers)) == 3
    namespaces = [f"ns{i}" for i in range(12)]  # spread over the three masters
    for namespace in namespaces:
        q.enqueue(ROOT_STEP, f"{namespace}/a")
        q.enqueue(ROOT_STEP, f"{namespace}/b")
    assert all(client.exists(marker) for marker in markers)
    running = {d.payload.namespace: q.start(d.payload, d.token, "w") for d in dispatcher.take()}
    # One master fails over to a replica that had not received its writes (no persistence): its
    # namespaces lose their leases and waiting rooms; the other masters keep theirs.
    lost = client.get_node_from_key(namespace_key("ns0", "leases"))
    client.flushall(target_nodes=lost)
    assert not q.redis_kept_its_data()  # its marker is gone: repaired from the ledger
    for namespace, attempt in running.items():
        assert attempt is not None and q.renew(attempt).value == "running", namespace  # leases are back
    q.enqueue(ROOT_STEP, "ns0/c")
    assert dispatcher.take() == []  # every namespace is at its limit of 1, on every master
    assert {namespace: c.running for namespace, c in q.counts().items()} == dict.fromkeys(namespaces, 1)
    assert q.redis_kept_its_data()


@on_the_cluster
def test_the_reaper_serves_namespaces_on_every_master_in_one_pass_even_after_the_scripts_were_flushed(
    stores: Stores,
) -> None:
    q, dispatcher = make_queue(limit=1, started_ttl=0)
    client = stores.redis()
    namespaces = [f"ns{i}" for i in range(12)]
    assert len(_node_names(client, [namespace_key(ns, "leases") for ns in namespaces])) == 3
    for namespace in namespaces:
        q.enqueue(ROOT_STEP, f"{namespace}/a")
        q.enqueue(ROOT_STEP, f"{namespace}/b")
    for dispatch in dispatcher.take():
        assert q.start(dispatch.payload, dispatch.token, "w")
    client.script_flush()  # as a master replaced by a new node would be: it has never seen our scripts
    report = q.reap()
    assert report is not None and len(report.requeued) == len(namespaces)
    assert sorted(d.payload.namespace for d in dispatcher.take()) == sorted(namespaces)
    overview = q.limiter.overview()
    assert {ns: (o.waiting, o.queued) for ns, o in overview.items()} == dict.fromkeys(namespaces, (1, 1))
    assert all(o.oldest_wait is not None and 0 <= o.oldest_wait < 60 for o in overview.values())


@pytest.mark.parametrize("redis_topology", [SINGLE, CLUSTER], indirect=True)
def test_a_script_batch_after_the_scripts_were_flushed_keeps_its_order(stores: Stores) -> None:
    q, _ = make_queue(limit=1)
    client = stores.redis()
    script = q.limiter.scripts["journaled"]  # harmless here: an empty journal
    script(keys=namespace_keys("org"), args=["", 0])  # loaded
    for flushed in (False, True):
        if flushed:
            client.script_flush()  # a restarted Redis: it has never seen our scripts
        batch = ScriptBatch(client)
        batch.pipe.rpush("{order}:log", "before")
        batch.script(script, namespace_keys("org"), ["", 0])
        batch.pipe.rpush("{order}:log", "after")
        assert batch.execute()[0:1] == [1]
        log = [entry.decode() for entry in client.lrange("{order}:log", 0, -1)]
        # A command queued after a script that had to be loaded runs again after it (safe to repeat).
        assert log == (["before", "after", "after"] if flushed else ["before", "after"])
        client.delete("{order}:log")


@pytest.mark.slow
@on_the_cluster
def test_a_real_worker_runs_a_pipeline_with_the_limiter_on_the_cluster_and_the_broker_on_one_redis(
    stores: Stores, celery_app: Celery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert stores.broker_url is not None
    env = use_settings(
        monkeypatch,
        {
            **stores.env(),
            "COMMON_HF_ENDPOINT": f"file://{tmp_path / 'mirror'}",
            "ASSETS_STORAGE_DIRECTORY": str(tmp_path / "assets"),
            "WORKER_PARQUET_DIRECTORY": str(tmp_path / "parquet"),
            "WORKER_METRICS_PORT": "0",
        },
    )
    dataset = samples.csv_dataset(tmp_path / "mirror")
    with sample_worker("cluster", env, tmp_path):
        steps.dataset_config_names.delay(dataset)
        entries = wait_until_settled(dataset)
    defaults = {key: entry for key, entry in entries.items() if not key[0].startswith("test-")}
    assert all(entry.is_success for entry in defaults.values()), {k: e.error_code for k, e in defaults.items()}
    graph_steps = {step.name for step in get_processing_graph() if not step.name.startswith("test-")}
    assert {kind for kind, _, _ in defaults} == graph_steps  # every step of the graph ran, heavy ones too
    assert all(job.status == JobStatus.SUCCESS for job in get_queue().jobs(dataset))
    # What goes where: the events on the cluster, Celery's messages and results on the single Redis.
    told = {event.type for _, event in EventBus(stores.redis()).read("0-0", count=10_000)}
    assert {"job.queued", "job.started", "job.succeeded", "cache.updated", "task.succeeded"} <= told
    broker_keys = [key.decode() for key in redis.Redis.from_url(stores.broker_url).scan_iter()]
    assert any(key.startswith("celery-task-meta-") for key in broker_keys)
    assert not [key for key in broker_keys if "stepcache" in key], broker_keys


@pytest.mark.slow
@pytest.mark.parametrize("redis_topology", [SENTINEL], indirect=True)
def test_a_sentinel_managed_redis_serves_the_broker_and_the_limiter_of_a_real_worker(
    stores: Stores, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests import sample_steps

    assert stores.redis_url.startswith("redis+sentinel://") and stores.broker_url is None
    env = use_settings(monkeypatch, {**stores.env(), "WORKER_METRICS_PORT": "0"})
    with current_app_for(stores.redis_url) as app, sample_worker("sentinel", env, tmp_path, concurrency=2):
        assert app.conf.broker_url.startswith("sentinel://")
        result = sample_steps.test_noop.delay("org/ds")
        assert result.get(timeout=60)["http_status"] == 200  # the result, through the Sentinel's master
        ledger = get_queue(app).ledger
        job = eventually(lambda: (job := ledger.get(result.id)) and job.status == JobStatus.SUCCESS and job, "success")
    assert job.namespace == "org"
    master = stores.redis()
    assert isinstance(master, redis.Redis)
    assert master.exists(epoch_keys(master)[0][1])  # the limiter's marker, on the master the Sentinel names
