"""Safe to expose, over real HTTP against real servers: one dataset is one set of files with one access
decision, event streams are bounded, connections are bounded, and no answer leaks what is inside."""

from __future__ import annotations

import io
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from common.event_bus import EventBus
from common.events import JobQueued
from common.exceptions import DatasetNotFoundError
from common.sources import LocalMirror
from tasks import cli, samples, steps
from tasks.embedded import start_mongo, start_redis
from tasks.queue import get_queue
from tests.api_server import api_client, api_server
from tests.conftest import Stores, use_settings
from tests.test_api import events_of, get_until_ready
from tests.test_api_auth import mirror, token  # noqa: F401  (the fixture)
from tests.waiting import eventually

CACHED_PATHS = ("/first-rows", "/statistics", "/parquet", "/info", "/size", "/splits", "/is-valid")


@pytest.fixture
def client(mirror: Path) -> Iterator[httpx.Client]:  # noqa: F811
    with api_client() as client:
        yield client


def _params(path: str, dataset: str) -> dict[str, str]:
    split = {"config": "default", "split": "train"}
    return {"dataset": dataset} | (split if path in ("/first-rows", "/statistics") else {})


def nested_mirror(root: Path) -> None:
    """A gated `acme/secret`; a gated canonical `vault` with a data folder; a public `org/leak` with a link
    to the gated file; a namespace `closed` gated as a whole; a public-looking `org/deep` gated inside."""
    samples.csv_dataset(root, "acme/secret")
    (root / "acme/secret/.gated").write_text("")
    samples.write(root / "vault/README.md", "# vault\n")
    samples.write(root / "vault/data/train.csv", "id,text\n1,secret\n")
    (root / "vault/.gated").write_text("")
    samples.csv_dataset(root, "org/leak")
    os.symlink(root / "acme/secret/train.csv", root / "org/leak/other.csv")
    os.symlink(root / "acme/secret", root / "org/linked")
    samples.csv_dataset(root, "closed/data")
    (root / "closed/.private").write_text("")
    samples.csv_dataset(root, "org/deep")
    samples.write(root / "org/deep/sub/more.csv", "id,text\n9,inner\n")
    (root / "org/deep/sub/.gated").write_text("")


def test_a_mirror_dataset_is_one_folder_with_one_access_decision(tmp_path: Path) -> None:
    nested_mirror(tmp_path)
    source = LocalMirror(tmp_path)
    for name in ("acme", "vault/data", "org/leak", "org/linked", "closed", "nowhere", "org/nowhere"):
        with pytest.raises(DatasetNotFoundError) as refused:
            source.access(name)
        assert str(tmp_path) not in refused.value.message
    assert source.access("acme/secret") == "gated"
    assert source.access("vault") == "gated"
    assert source.access("closed/data") == "private"  # the namespace's marker
    assert source.access("org/deep") == "gated"  # a marker under the dataset's folder
    samples.csv_dataset(tmp_path, "org/loop")
    os.symlink(tmp_path / "org/loop/a", tmp_path / "org/loop/b")
    os.symlink(tmp_path / "org/loop/b", tmp_path / "org/loop/a")  # a loop: refused, not a 500
    samples.csv_dataset(tmp_path, "org/hidden")
    samples.write(tmp_path / "org/hidden/.h/.gated", "")  # a marker in a hidden folder counts too
    with pytest.raises(DatasetNotFoundError):
        source.access("org/loop")
    assert source.access("org/hidden") == "gated"
    samples.csv_dataset(tmp_path, "org/open")
    os.symlink(tmp_path / "org/open/train.csv", tmp_path / "org/open/same.csv")  # a link inside: fine
    assert source.access("org/open") == "public"


def test_a_gated_datasets_rows_are_not_served_under_another_name(client: httpx.Client, mirror: Path) -> None:  # noqa: F811
    nested_mirror(mirror)
    for dataset in ("acme", "vault/data", "org/leak", "org/linked", "closed"):
        for path in CACHED_PATHS:
            answer = client.get(path, params=_params(path, dataset))
            # The viewer's answer for a dataset that does not exist: the same as for a gated one without a JWT.
            assert (answer.status_code, answer.json()["error_code"]) == (401, "ExternalUnauthenticatedError"), path
            assert str(mirror) not in answer.text and "secret" not in answer.text.replace(dataset, "")
        assert get_queue().jobs(dataset) == []  # nothing converted on an anonymous GET
    for dataset in ("acme/secret", "vault", "closed/data", "org/deep"):
        assert client.get("/first-rows", params=_params("/first-rows", dataset)).status_code == 401


def test_the_dataset_under_a_gated_namespace_is_served_with_a_token(
    client: httpx.Client,
    mirror: Path,  # noqa: F811
    celery_worker: object,
) -> None:
    nested_mirror(mirror)
    headers = {"Authorization": f"Bearer {token('closed/data')}"}
    answers = get_until_ready(client, "/first-rows", headers=headers, **_params("/first-rows", "closed/data"))
    assert answers[-1].status_code == 200 and answers[-1].json()["rows"]


def test_a_replay_reads_only_its_jobs_events(
    client: httpx.Client,
    mirror: Path,  # noqa: F811
    celery_worker: object,
    stores: Stores,
) -> None:
    dataset = samples.csv_dataset(mirror)
    job_id = steps.dataset_config_names.delay(dataset).id
    story = events_of(client, job_id)
    bus, others = EventBus(stores.redis()), JobQueued(job_id="other", step="x", dataset="org/other", namespace="org")
    for _ in range(20):
        bus.publish_many([others] * 1_000)  # 20,000 events of another job after this one's
    with monitored(stores.redis()) as commands:
        replayed = events_of(client, job_id, last_event_id="0-0")
    assert [event[:2] for event in replayed] == [event[:2] for event in story]
    reads = [command for command in commands if command.split()[0].upper() in {"XREAD", "XRANGE", "XREVRANGE"}]
    assert reads and all(bus.job_stream(job_id, "org") in command for command in reads), reads[:5]


@contextmanager
def monitored(redis: Any) -> Iterator[list[str]]:
    """The commands Redis runs while the block runs (Redis' MONITOR), each as one line of text."""
    commands: list[str] = []
    stop = f"stop-monitor-{time.monotonic_ns()}"
    ready = threading.Event()

    def listen() -> None:
        with redis.monitor() as monitor:
            ready.set()
            for command in monitor.listen():
                if stop in command["command"]:
                    return
                commands.append(command["command"])

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    ready.wait(5)
    time.sleep(0.1)
    try:
        yield commands
    finally:
        redis.echo(stop)
        thread.join(10)


def open_stream(url: str, job_id: str, address: str = "127.0.0.1", **headers: str) -> tuple[httpx.Client, Any]:
    """An event stream held open (from a client at `address`, any 127.x.y.z): its client and response."""
    client = httpx.Client(base_url=url, transport=httpx.HTTPTransport(local_address=address), timeout=30)
    response = client.send(client.build_request("GET", f"/jobs/{job_id}/events", headers=headers), stream=True)
    return client, response


def test_event_streams_are_capped_per_client_and_in_all(mirror: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    use_settings(monkeypatch, {"API_EVENTS_MAX_STREAMS_PER_CLIENT": "2", "API_EVENTS_MAX_STREAMS": "3"})
    dataset = samples.csv_dataset(mirror)
    job_id = steps.dataset_config_names.delay(dataset).id  # no worker: it waits
    opened: list[tuple[httpx.Client, Any]] = []
    with api_server() as url:
        try:
            opened += [open_stream(url, job_id), open_stream(url, job_id)]
            assert [response.status_code for _, response in opened] == [200, 200]
            third = open_stream(url, job_id)
            opened.append(third)
            assert third[1].status_code == 429 and third[1].headers["Retry-After"] == "5"
            third[1].read()
            assert third[1].json()["error_code"] == "TooManyStreamsError"
            opened.append(open_stream(url, job_id, "127.0.0.2"))  # another client: the third of 3 in all
            assert opened[-1][1].status_code == 200
            assert open_stream(url, job_id, "127.0.0.3")[1].status_code == 429  # none left in all
            opened[0][1].close()
            eventually(lambda: open_stream(url, job_id)[1].status_code == 200, "a closed stream frees its slot")
        finally:
            for client, response in opened:
                response.close()
                client.close()


def test_a_stream_of_a_waiting_job_closes_with_a_state_it_resumes_from(
    mirror: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_settings(monkeypatch, {"API_EVENTS_IDLE_SECONDS": "1"})
    dataset = samples.csv_dataset(mirror)
    job_id = steps.dataset_config_names.delay(dataset).id  # no worker: it waits
    with api_client() as client:
        started = time.monotonic()
        first = events_of(client, job_id)
        assert [kind for _, kind, _ in first] == ["job.queued", "job.state"] and time.monotonic() - started < 10
        assert first[-1][2]["status"] in ("waiting", "queued") and first[-1][0] == first[0][0]
        resumed = events_of(client, job_id, last_event_id=first[-1][0])
        assert [kind for _, kind, _ in resumed] == ["job.state"]  # nothing replayed twice


def slow_connections(url: str, count: int) -> list[socket.socket]:
    host, port = httpx.URL(url).host, httpx.URL(url).port
    connections = [socket.create_connection((host, port)) for _ in range(count)]
    for connection in connections:
        connection.sendall(b"GET /healthcheck HTTP/1.1\r\nHost: x\r\n")
    return connections


def closed_by_server(connection: socket.socket) -> bool:
    """Whether the server closed the connection (a read gets the end, or a reset)."""
    connection.settimeout(0.01)
    try:
        return connection.recv(1024) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_slow_or_silent_or_huge_headers_and_too_many_connections_are_bounded(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_settings(
        monkeypatch,
        {"API_HEADER_TIMEOUT_SECONDS": "4", "API_MAX_CONNECTIONS": "60", "API_MAX_CONNECTIONS_PER_CLIENT": "200"},
    )
    with api_server() as url, httpx.Client(base_url=url, timeout=10) as client:
        dripping = slow_connections(url, 50)
        silent = [socket.create_connection((httpx.URL(url).host, httpx.URL(url).port)) for _ in range(5)]
        started = time.monotonic()
        while time.monotonic() - started < 1.5:  # one header byte at a time: still open while it lasts
            for connection in dripping:
                connection.sendall(b"X")
            time.sleep(0.3)
        assert not any(closed_by_server(connection) for connection in dripping)
        assert client.get("/healthcheck").status_code == 200  # 56 of 60 connections: still served
        eventually(
            lambda: all(closed_by_server(connection) for connection in dripping + silent),
            "every connection whose headers did not arrive in time is closed",
            timeout=8,
        )
        huge = client.get("/healthcheck", headers={"X-Big": "x" * 1_000_000})
        assert huge.status_code == 400
        crowd = slow_connections(url, 60)
        assert client.get("/healthcheck").status_code == 503  # past API_MAX_CONNECTIONS
        for connection in dripping + silent + crowd:
            connection.close()
        eventually(lambda: client.get("/healthcheck").status_code == 200, "served again once they left")


def test_one_client_cannot_take_every_connection_nor_pass_for_others(
    mirror: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_settings(monkeypatch, {"API_MAX_CONNECTIONS_PER_CLIENT": "5", "API_EVENTS_MAX_STREAMS_PER_CLIENT": "1"})
    job_id = steps.dataset_config_names.delay(samples.csv_dataset(mirror)).id  # no worker: it waits
    with api_server() as url:
        hogging = slow_connections(url, 5)
        extra = slow_connections(url, 1)
        eventually(lambda: closed_by_server(extra[0]), "a sixth connection of one client is closed at once")
        other = httpx.Client(base_url=url, transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=10)
        assert other.get("/healthcheck").status_code == 200  # another client is served meanwhile
        for connection in hogging + extra:
            connection.close()
        opened = [open_stream(url, job_id, "127.0.0.3", **{"X-Forwarded-For": f"10.0.0.{i}"}) for i in range(3)]
        try:  # X-Forwarded-For is believed only from API_TRUSTED_PROXIES (none): one client, one stream
            assert [response.status_code for _, response in opened] == [200, 429, 429]
        finally:
            for client, response in opened:
                response.close()
                client.close()
            other.close()


def test_every_answer_but_a_begun_stream_is_bounded_by_the_request_timeout(
    stores: Stores, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    server = start_mongo(tmp_path)
    use_settings(monkeypatch, {"QUEUE_MONGO_URL": server.url, "API_REQUEST_TIMEOUT_SECONDS": "2"})
    os.kill(server.process.pid, signal.SIGSTOP)  # the ledger stalls before the API ever reached it
    try:
        with api_client() as client:
            answers: dict[str, tuple[int, float]] = {}

            def timed(path: str) -> None:
                started = time.monotonic()
                answers[path] = (client.get(path).status_code, time.monotonic() - started)

            threads = [threading.Thread(target=timed, args=(path,)) for path in ("/jobs/abc", "/jobs/events")]
            for thread in threads:
                thread.start()
            time.sleep(0.3)
            timed("/nowhere")  # meanwhile, the API answers what needs no store at once
            for thread in threads:
                thread.join()
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
        server.stop()
    assert answers["/nowhere"][0] == 404 and answers["/nowhere"][1] < 1, answers
    for path in ("/jobs/abc", "/jobs/events"):
        assert answers[path][0] in (503, 504) and answers[path][1] < 4, answers


@pytest.mark.parametrize("store", ["redis", "mongo"])
def test_the_healthcheck_answers_within_the_timeout_when_a_store_stalls(
    store: str, stores: Stores, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    server = start_redis(tmp_path) if store == "redis" else start_mongo(tmp_path)
    variable = "QUEUE_REDIS_URL" if store == "redis" else "CACHE_MONGO_URL"
    use_settings(monkeypatch, {variable: server.url, "API_REQUEST_TIMEOUT_SECONDS": "2"})
    try:
        with api_client() as client:
            assert client.get("/healthcheck").status_code == 200
            os.kill(server.process.pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                answer = client.get("/healthcheck")
                elapsed = time.monotonic() - started
                answer_again = client.get("/healthcheck")  # the stalled first one still holds a thread
            finally:
                os.kill(server.process.pid, signal.SIGCONT)
            assert (answer.status_code, answer.json()["error_code"]) == (504, "RequestTimeoutError")
            assert elapsed < 4 and answer_again.status_code in (503, 504)
            eventually(lambda: client.get("/healthcheck").status_code == 200, "healthy once the store answers")
    finally:
        server.stop()


README_OUTSIDE = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: "../../acme/secret/*.csv"
- config_name: datadir
  data_dir: "../../acme/secret"
- config_name: host
  data_files:
  - split: train
    path: "{host_file}"
---
"""
README_MEDIA = """---
dataset_info:
  features:
  - name: image
    dtype: image
---
"""


@pytest.mark.parametrize("config", ["default", "datadir", "host"])
def test_a_readme_cannot_make_a_dataset_read_files_that_are_not_its_own(
    client: httpx.Client,
    mirror: Path,  # noqa: F811
    celery_worker: object,
    config: str,
) -> None:
    nested_mirror(mirror)
    host_file = samples.write(mirror.parent / "credentials.csv", "id,text\n1,host secret\n")
    samples.write(mirror / "org/pub/README.md", README_OUTSIDE.format(host_file=host_file))
    samples.write(mirror / "org/pub/train.csv", "id,text\n1,public\n")
    answer = get_until_ready(client, "/first-rows", dataset="org/pub", config=config, split="train")[-1]
    assert (answer.status_code, answer.json()["error_code"]) == (403, "DataFilesOutsideDatasetError"), answer.text
    assert "secret" not in answer.text.replace("acme/secret", "") and str(mirror) not in answer.text


def test_a_media_cell_cannot_name_a_file_that_is_not_the_datasets_own(tmp_path: Path) -> None:
    from common.exceptions import DataFilesOutsideDatasetError
    from common.reading import open_split

    outside = samples.write(tmp_path / "host.png", b"\x89PNG not the dataset's")
    root = tmp_path / "mirror"
    samples.write(root / "org/pub/README.md", README_MEDIA)
    samples.write(root / "org/pub/train.csv", f"image\n{outside}\n")
    samples.image_dataset(root, "org/images")
    source = LocalMirror(root)
    split = open_split(source, source.locate("org/pub", source.revision("org/pub")), "default", "train")
    with pytest.raises(DataFilesOutsideDatasetError):
        split.embed(next(split.batches(10)))
    own = open_split(source, source.locate("org/images", source.revision("org/images")), "default", "train")
    assert all(cell["bytes"] for cell in own.embed(next(own.batches(10))).column("image").to_pylist())


def test_entries_of_names_that_are_no_longer_datasets_are_pruned(mirror: Path) -> None:  # noqa: F811
    from common import cache
    from tasks.removal import prune

    nested_mirror(mirror)
    for dataset in ("acme", "vault/data", "acme/secret", "vault"):
        cache.upsert_response("dataset-size", dataset, {"size": {}})
    source = LocalMirror(mirror)
    assert prune(source, dry_run=True) == ["acme", "vault/data"]
    assert len(cache.get_dataset_responses("acme")) == 1
    out = io.StringIO()
    assert cli.prune(True, out) == 0 and out.getvalue() == "would remove acme\nwould remove vault/data\n"
    assert prune(source) == ["acme", "vault/data"]
    assert cache.dataset_names() == ["acme/secret", "vault"]
    assert prune(source) == []


def test_an_operator_request_is_refused_before_its_body_is_read(mirror: Path) -> None:  # noqa: F811
    with api_server() as url:
        host, port = httpx.URL(url).host, httpx.URL(url).port
        for signature in ("f" * 63, "not hex"):
            connection = socket.create_connection((host, port))
            connection.settimeout(5)
            stamp = str(int(time.time()))
            connection.sendall(
                b"POST /admin/refresh?dataset=org/x HTTP/1.1\r\nHost: x\r\nContent-Length: 4000\r\n"
                + f"X-Stepcache-Timestamp: {stamp}\r\nX-Stepcache-Signature: {signature}\r\n\r\n".encode()
            )  # and no body at all
            assert connection.recv(1024).startswith(b"HTTP/1.1 401")
            connection.close()
        too_big = httpx.post(
            f"{url}/admin/refresh?dataset=org/x",
            content=b"x" * 5000,
            headers={"X-Stepcache-Timestamp": str(int(time.time())), "X-Stepcache-Signature": "f" * 64},
        )
        assert too_big.status_code == 413
