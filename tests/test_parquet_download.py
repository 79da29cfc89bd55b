"""The Parquet export is downloadable over real HTTP: DuckDB (httpfs, loaded offline), Polars and pandas read
every `/parquet` URL and find the source rows; Range requests, ETags and the access rules of the dataset
hold, and no path leaves the files the dataset's current config-parquet entry lists."""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote, unquote, urlsplit

import duckdb
import httpx
import jsonschema  # type: ignore[import-untyped]
import pandas as pd
import polars as pl
import pytest

from common import cache
from common.config import get_config
from tasks import samples
from tasks.embedded import ROOT
from tests.api_server import api_client
from tests.conftest import Stores, use_settings
from tests.tcp_proxy import TcpProxy
from tests.test_api import get_until_ready
from tests.test_api_auth import ASSETS_KEY, AUDIENCE, PUBLIC_PEM, raw_get, token
from tests.test_pipeline import use_pipeline_settings, wait_until_settled

REFERENCE = ROOT.parent / "shared" / "reference" / "dataset-viewer-openapi.json"


@pytest.fixture
def mirror(stores: Stores, default_graph: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    root = tmp_path / "mirror"
    root.mkdir()
    use_pipeline_settings(
        monkeypatch,
        tmp_path,
        f"file://{root}",
        API_JWT_PUBLIC_KEY=PUBLIC_PEM.replace("\n", "\\n"),
        API_JWT_ALGORITHM="EdDSA",
        API_JWT_AUDIENCE=AUDIENCE,
        API_ASSETS_SIGNING_KEY=ASSETS_KEY,
        API_ACCESS_CACHE_SECONDS="0",
        API_BACKFILL_INTERVAL_SECONDS="3600",
        API_CORS_ORIGINS="*",
    )
    return root


@pytest.fixture
def client(mirror: Path) -> Iterator[httpx.Client]:
    with api_client() as client:
        yield client


def parquet_files(client: httpx.Client, dataset: str, headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The dataset's Parquet files as `/parquet` lists them once every step of the dataset ran."""
    get_until_ready(client, "/parquet", headers=headers, dataset=dataset)
    wait_until_settled(dataset)
    answer = client.get("/parquet", params={"dataset": dataset}, headers=headers)
    assert answer.status_code == 200 and answer.json()["pending"] == [], answer.text
    files: list[dict[str, Any]] = answer.json()["parquet_files"]
    return files


def duckdb_connection() -> duckdb.DuckDBPyConnection:
    """DuckDB with httpfs loaded from the duckdb-ext-httpfs package: nothing is downloaded."""
    spec = importlib.util.find_spec("duckdb_ext")
    assert spec is not None and spec.submodule_search_locations, "pip install duckdb-ext-httpfs"
    extensions = Path(next(iter(spec.submodule_search_locations))) / "extensions"
    settings: dict[str, str | bool | int | float | list[str]] = {
        "extension_directory": str(extensions),
        "autoinstall_known_extensions": False,
    }
    connection = duckdb.connect(config=settings)
    connection.execute("LOAD httpfs")
    return connection


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as plain values, a missing value as None (each reader has its own NaN, NA or None)."""
    return [
        {name: None if not isinstance(value, (list, dict)) and pd.isna(value) else value for name, value in row.items()}
        for row in frame.astype(object).to_dict("records")
    ]


def read_everywhere(url: str, connection: duckdb.DuckDBPyConnection) -> list[list[dict[str, Any]]]:
    """The rows of the file at `url` as DuckDB, Polars (eager and lazy) and pandas read them."""
    return [
        records(connection.sql(f"SELECT * FROM read_parquet('{url}')").df()),
        records(pl.read_parquet(url).to_pandas()),
        records(pl.scan_parquet(url).collect().to_pandas()),
        records(pd.read_parquet(url)),
    ]


def source_rows(mirror: Path, dataset: str, config: str, split: str) -> list[dict[str, Any]]:
    """The rows of the sample datasets as their files hold them."""
    folder = mirror / dataset
    if dataset == "org/csv":
        return records(pd.read_csv(folder / f"{split}.csv"))
    if dataset == "org/jsonl":
        return records(pd.read_json(folder / split / "0.jsonl", lines=True))
    if dataset == "org/parquet":
        return records(pd.read_parquet(folder / "data" / "train-00000-of-00001.parquet"))
    if dataset == "org/multi":
        return records(pd.read_csv(folder / "data" / config / ("a.csv" if config == "en" else f"{split}.csv")))
    raise AssertionError(dataset)


def test_duckdb_polars_and_pandas_read_every_parquet_url_and_find_the_source_rows(
    client: httpx.Client, mirror: Path, celery_worker: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    contract = json.loads(REFERENCE.read_text())
    hub_file = contract["components"]["schemas"]["SplitHubFile"]
    connection = duckdb_connection()
    storage = get_config().worker.parquet_path
    for make in (samples.csv_dataset, samples.jsonl_dataset, samples.parquet_dataset, samples.multi_config_dataset):
        dataset = make(mirror)
        files = parquet_files(client, dataset)
        size = client.get("/size", params={"dataset": dataset}).json()["size"]
        num_rows = {(split["config"], split["split"]): split["num_rows"] for split in size["splits"]}
        assert sorted((file["config"], file["split"]) for file in files) == sorted(num_rows)
        for file in files:
            jsonschema.validate(file, hub_file)
            assert file["url"] == f"{client.base_url}/parquet-files/{quote(file['path'])}"  # public: not signed
            assert file["filename"] == "0000.parquet" and file["size"] == (storage / file["path"]).stat().st_size
            expected = source_rows(mirror, dataset, file["config"], file["split"])
            for rows in read_everywhere(file["url"], connection):
                assert rows == expected, (file["url"], rows[:3], expected[:3])
            assert len(expected) == num_rows[(file["config"], file["split"])]
    # An image folder: each row's image holds the bytes of its source file.
    dataset = samples.image_dataset(mirror)
    [file] = parquet_files(client, dataset)
    images = connection.sql(f"SELECT image.bytes AS image FROM read_parquet('{file['url']}')").fetchall()
    assert sorted(image for (image,) in images) == sorted(png.read_bytes() for png in (mirror / dataset).rglob("*.png"))
    # The URLs start with API_PUBLIC_URL when it is set; an answer's ETag changes with its URLs.
    before = client.get("/parquet", params={"dataset": dataset})
    use_settings(monkeypatch, {"API_PUBLIC_URL": "https://viewer.example.org/base/"})
    after = client.get("/parquet", params={"dataset": dataset})
    assert after.json()["parquet_files"][0]["url"] == f"https://viewer.example.org/base/parquet-files/{file['path']}"
    assert after.headers["ETag"] != before.headers["ETag"]
    assert (
        client.get(
            "/parquet", params={"dataset": dataset}, headers={"If-None-Match": after.headers["ETag"]}
        ).status_code
        == 304
    )


def test_range_requests_etags_and_head_follow_http(client: httpx.Client, mirror: Path, celery_worker: object) -> None:
    dataset = samples.csv_dataset(mirror)
    file = next(file for file in parquet_files(client, dataset) if file["split"] == "train")
    url, local = file["url"], get_config().worker.parquet_path / file["path"]
    content, size = local.read_bytes(), local.stat().st_size
    whole = client.get(url)
    assert whole.status_code == 200 and whole.content == content
    assert whole.headers["Content-Length"] == str(size) and whole.headers["Accept-Ranges"] == "bytes"
    assert whole.headers["Content-Type"] == "application/vnd.apache.parquet"
    assert whole.headers["Cache-Control"].startswith("public")
    tag, modified = whole.headers["ETag"], whole.headers["Last-Modified"]
    # A header built to make a regular expression backtrack: answered at once, with the whole file.
    spaced = client.get(url, headers={"Range": "bytes=" + " " * 8000 + "-" + " " * 8000 + "x"})
    assert spaced.status_code == 200 and spaced.content == content
    # The URLs follow the request's Host (API_PUBLIC_URL unset): a shared cache must key on it.
    assert "Host" in client.get("/parquet", params={"dataset": dataset}).headers["Vary"]
    head = client.head(url)
    assert head.status_code == 200 and head.content == b""
    assert (head.headers["Content-Length"], head.headers["ETag"]) == (str(size), tag)
    for asked, (start, end) in {
        "bytes=0-3": (0, 4),
        "bytes=10-": (10, size),
        "bytes=-8": (size - 8, size),
        f"bytes=100-{size * 10}": (100, size),
        f"bytes={size - 1}-{size - 1}": (size - 1, size),
        "bytes=-999999999999999999999999": (0, size),
        "Bytes=5 - 9": (5, 10),
    }.items():
        part = client.get(url, headers={"Range": asked})
        assert part.status_code == 206, (asked, part.text)
        assert part.content == content[start:end], asked
        assert part.headers["Content-Range"] == f"bytes {start}-{end - 1}/{size}", asked
        assert part.headers["Content-Length"] == str(end - start) and part.headers["ETag"] == tag
    assert client.get(url, headers={"Range": "bytes=0-3"}).content == b"PAR1"
    assert client.get(url, headers={"Range": "bytes=-4"}).content == b"PAR1"
    for unsatisfiable in (f"bytes={size}-", f"bytes={size}-{size + 10}", "bytes=99999999999999999999999-", "bytes=-0"):
        refused = client.get(url, headers={"Range": unsatisfiable})
        assert refused.status_code == 416, (unsatisfiable, refused.text)
        assert refused.json()["error_code"] == "RangeNotSatisfiableError"
        assert refused.headers["Content-Range"] == f"bytes */{size}"
    # Several ranges, a malformed Range or another unit: the whole file, as HTTP allows.
    for ignored in ("bytes=0-1,4-5", "bytes=abc", "bytes=9-3", "items=0-3", "bytes=-"):
        answer = client.get(url, headers={"Range": ignored})
        assert (answer.status_code, answer.content) == (200, content), ignored
    # HEAD ignores Range (GET is the method ranges are for).
    assert client.head(url, headers={"Range": "bytes=0-3"}).headers["Content-Length"] == str(size)
    # If-None-Match: 304 without a body, weak or strong, alone or in a list; another tag: the file.
    for matching in (tag, f"W/{tag}", f'"other", {tag}', "*"):
        unchanged = client.get(url, headers={"If-None-Match": matching})
        assert (unchanged.status_code, unchanged.content, unchanged.headers["ETag"]) == (304, b"", tag), matching
    assert client.head(url, headers={"If-None-Match": tag}).status_code == 304
    assert client.get(url, headers={"If-None-Match": '"other"'}).status_code == 200
    # If-Range: the range while the file is the one the client has (by its ETag or date), else all of it.
    for validator in (tag, modified):
        assert client.get(url, headers={"Range": "bytes=0-3", "If-Range": validator}).status_code == 206
    for stale in ('"other"', f"W/{tag}", "Thu, 01 Jan 1970 00:00:00 GMT"):
        answer = client.get(url, headers={"Range": "bytes=0-3", "If-Range": stale})
        assert (answer.status_code, answer.content) == (200, content), stale
    # A conversion that replaces the file (a new inode) changes its ETag: a client's If-Range is then stale.
    copy = local.with_name("copy")
    shutil.copy2(local, copy)
    os.replace(copy, local)
    replaced = client.get(url, headers={"Range": "bytes=0-3", "If-Range": tag})
    assert replaced.status_code == 200 and replaced.headers["ETag"] != tag and replaced.content == content
    # A page of another origin may ask for ranges and read the answer's range headers.
    origin = {"Origin": "https://app.example"}
    preflight = client.options(
        url, headers={**origin, "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "range"}
    )
    assert preflight.status_code == 200 and "range" in preflight.headers["Access-Control-Allow-Headers"].lower()
    exposed = client.get(url, headers={**origin, "Range": "bytes=0-3"}).headers["Access-Control-Expose-Headers"]
    assert {"Content-Range", "Accept-Ranges", "Content-Length", "ETag"} <= set(exposed.split(", "))


def test_a_gated_dataset_s_files_need_its_jwt_or_a_signed_url(
    client: httpx.Client, mirror: Path, celery_worker: object
) -> None:
    dataset = samples.csv_dataset(mirror, "org/gated")
    (mirror / dataset / ".gated").write_text("")
    authorization = {"Authorization": f"Bearer {token(dataset)}"}
    unauthenticated = client.get("/parquet", params={"dataset": dataset})
    assert unauthenticated.status_code == 401
    files = parquet_files(client, dataset, authorization)
    answer = client.get("/parquet", params={"dataset": dataset, "config": "default"}, headers=authorization)
    assert answer.headers["Cache-Control"].startswith("private")
    assert answer.json()["parquet_files"] == files
    connection = duckdb_connection()
    for file in files:
        url = httpx.URL(file["url"])
        expires, signature = int(url.params["expires"]), url.params["signature"]
        assert expires >= time.time() + get_config().api.assets_url_ttl_seconds
        plain = str(url.copy_with(query=None))
        content = (get_config().worker.parquet_path / file["path"]).read_bytes()
        # Without the signature: the dataset's rules (a JWT for it).
        refused = client.get(plain)
        assert (refused.status_code, refused.json()["error_code"]) == (401, unauthenticated.json()["error_code"])
        other = client.get(plain, headers={"Authorization": f"Bearer {token('org/other')}"})
        forbidden = client.get("/parquet", params={"dataset": dataset}, headers=other.request.headers)
        assert (other.status_code, other.json()["error_code"]) == (
            forbidden.status_code,
            forbidden.json()["error_code"],
        )
        assert other.status_code in (403, 404)  # (the viewer hides a dataset a token does not open)
        assert client.get(plain, headers=authorization).content == content
        # With it: no JWT needed, in every reader.
        signed = client.get(file["url"])
        assert signed.status_code == 200 and signed.content == content
        assert signed.headers["Cache-Control"].startswith("private")
        assert client.get(file["url"], headers={"Range": "bytes=-4"}).content == b"PAR1"
        rows = connection.sql(f"SELECT count(*) FROM read_parquet('{file['url']}')").fetchone()
        assert rows is not None and rows[0] == len(pl.read_parquet(file["url"])) == len(pd.read_parquet(file["url"]))
        path = unquote(url.path)  # what is signed: the route's path, percent-decoded
        past = int(time.time()) - 1

        def sign(message: str, until: int) -> str:
            return hmac.new(ASSETS_KEY.encode(), f"{message}\n{until}".encode(), hashlib.sha256).hexdigest()

        refusals: dict[str, tuple[dict[str, str | int], str]] = {
            "tampered": ({"expires": expires, "signature": "0" * 64}, "InvalidSignatureError"),
            "a later expiry": ({"expires": expires + 3600, "signature": signature}, "InvalidSignatureError"),
            "expired": ({"expires": past, "signature": sign(path, past)}, "ExpiredSignatureError"),
            "as an asset's": (
                {"expires": expires, "signature": sign(path.removeprefix("/"), expires)},
                "InvalidSignatureError",
            ),
            "no expiry": ({"signature": signature}, "MissingSignatureError"),
            "no signature": ({"expires": expires}, "MissingSignatureError"),
        }
        for name, (params, code) in refusals.items():
            answer = client.get(plain, params=params)
            assert (answer.status_code, answer.json()["error_code"]) == (403, code), (name, answer.text)
        # Another file's signature does not open this one.
        another = next(f for f in files if f["path"] != file["path"])
        borrowed = client.get(plain, params=dict(httpx.URL(another["url"]).params))
        assert (borrowed.status_code, borrowed.json()["error_code"]) == (403, "InvalidSignatureError")


def test_no_path_serves_a_file_the_current_entry_does_not_list(
    client: httpx.Client, mirror: Path, celery_worker: object, tmp_path: Path
) -> None:
    dataset = samples.csv_dataset(mirror)
    files = parquet_files(client, dataset)
    storage = get_config().worker.parquet_path
    listed = next(file for file in files if file["split"] == "train")["path"]
    revision = listed.split("/--/")[1]
    secret = tmp_path / "secret.parquet"
    secret.write_text("TOP SECRET CONTENT")
    # Files on disk that no current entry lists: an older revision's, another config's, another name's.
    stale = storage / dataset / "--" / "0ld" / "--" / "default" / "train" / "0000.parquet"
    foreign = storage / dataset / "--" / revision / "--" / "other" / "train" / "0000.parquet"
    extra = storage / dataset / "--" / revision / "--" / "default" / "train" / "0001.parquet"
    for path in (stale, foreign, extra):
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(secret, path)
    not_found = {
        "dot dot": f"{dataset}/--/{revision}/--/default/../../../../../../secret.parquet",
        "encoded dot dot": f"{dataset}/--/{revision}/--/default/%2e%2e/%2E%2E/%2e%2e/secret.parquet",
        "dot dot as the revision": f"{dataset}/--/../--/default/train/0000.parquet",
        "a dot": f"{dataset}/--/{revision}/--/default/./0000.parquet",
        "absolute": str(secret),
        "double slash": f"/{secret}",
        "backslash": f"{dataset}/--/{revision}/--/default/train\\..\\0000.parquet",
        "NUL": f"{dataset}/--/{revision}/--/default/train/0000.parquet%00",
        "too short": f"{dataset}/--/{revision}",
        "too long": f"{dataset}/--/{revision}/--/default/train/x/0000.parquet",
        "not a Parquet file name": f"{dataset}/--/{revision}/--/default/train/secret.txt",
        "a revision with a space": f"{dataset}/--/a%20b/--/default/train/0000.parquet",
        "an older revision's": stale.relative_to(storage).as_posix(),
        "a config not in the entry": foreign.relative_to(storage).as_posix(),
        "a file not in the entry": extra.relative_to(storage).as_posix(),
        "another dataset's": listed.replace(dataset, samples.jsonl_dataset(mirror), 1),  # public, not converted
    }
    for name, path in not_found.items():
        status, body = raw_get(client, f"/parquet-files/{path}")
        assert (status, json.loads(body)["error_code"]) == (404, "NotFoundError"), (name, body)
        assert b"TOP SECRET" not in body, name
    bad_names = {
        "a dataset with --": ("a--b/--/0/--/default/train/0000.parquet", "InvalidDatasetNameError"),
        "a config with a space around": (f"{dataset}/--/0/--/%20default/train/0000.parquet", "InvalidConfigNameError"),
    }
    for name, (path, code) in bad_names.items():
        status, body = raw_get(client, f"/parquet-files/{path}")
        assert (status, json.loads(body)["error_code"]) == (422, code), (name, body)
    # A listed path that is a symbolic link (out of the storage) is not followed.
    original = storage / listed
    original.rename(original.with_name("moved"))
    original.symlink_to(secret)
    status, body = raw_get(client, f"/parquet-files/{listed}")
    assert status == 404 and b"TOP SECRET" not in body
    original.unlink()
    original.with_name("moved").rename(original)
    assert client.get(f"/parquet-files/{listed}").status_code == 200
    # An entry that is an error lists nothing.
    entry = cache.get_response("config-parquet", dataset, "default")
    cache.upsert_response(
        "config-parquet", dataset, {"error": "broken"}, config="default", http_status=500, error_code="X"
    )
    assert client.get(f"/parquet-files/{listed}").status_code == 404
    cache.upsert_response("config-parquet", dataset, entry.content, config="default")
    assert client.get(f"/parquet-files/{listed}").status_code == 200
    assert secret.read_text() == "TOP SECRET CONTENT"


class CountingProxy(TcpProxy):
    """A TcpProxy that counts the bytes the target sends back (the API's answers, headers included)."""

    received = 0

    def _pump(self, source: socket.socket, sink: socket.socket, pair: tuple[socket.socket, socket.socket]) -> None:
        proxy, upstream = self, pair[1]

        class Counted:
            def recv(self, size: int) -> bytes:
                data = upstream.recv(size)
                proxy.received += len(data)
                return data

        super()._pump(cast(socket.socket, Counted()) if source is upstream else source, sink, pair)


def test_duckdb_reads_only_the_columns_it_projects(client: httpx.Client, mirror: Path, celery_worker: object) -> None:
    dataset = "org/wide-text"
    lines = "".join(f"{i},{os.urandom(500).hex()}\n" for i in range(2000))  # 2 MB, barely compressible
    samples.write(mirror / dataset / "train.csv", "id,blob\n" + lines)
    [file] = parquet_files(client, dataset)
    host, port = urlsplit(file["url"]).hostname, urlsplit(file["url"]).port
    assert host is not None and port is not None
    proxy = CountingProxy(host, port)
    with proxy:
        url = file["url"].replace(f":{port}/", f":{proxy.port}/")
        read = {}
        for name, query in (("id", "SELECT sum(id) FROM read_parquet(?)"), ("*", "SELECT * FROM read_parquet(?)")):
            proxy.received = 0
            connection = duckdb_connection()  # a new one each time: nothing cached from the query before
            assert connection.execute(query, [url]).fetchall()
            connection.close()
            read[name] = proxy.received
        proxy.received = 0
        assert pl.scan_parquet(url).select("id").collect().height == 2000
        read["Polars id"] = proxy.received
    size = file["size"]
    print(
        f"\nOver HTTP, a {size:,}-byte file: DuckDB read {read['id']:,} bytes for `id` alone, {read['*']:,} for "
        f"every column; Polars {read['Polars id']:,} for `id` alone"
    )
    assert read["id"] < size / 20 and read["*"] > size * 0.9
