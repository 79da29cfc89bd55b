"""The local Hub of tests/hub_server.py, against huggingface_hub and datasets as they call huggingface.co.

Both libraries read HF_ENDPOINT at import time: their calls run in a subprocess pointed at the server (online).
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.hub_server import HubServer

CONFIGS_README = """---
configs:
- config_name: first
  data_files:
  - split: train
    path: first/train.csv
  - split: test
    path: first/test.csv
- config_name: second
  data_dir: second
---
# Two configs
"""

# Runs before each snippet: `outcome(call)` is what the call returned, or the exception it raised (class, HTTP status).
PRELUDE = """
import json
def outcome(call):
    try:
        return {"result": call()}
    except Exception as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        return {"error": f"{type(e).__module__}.{type(e).__qualname__}", "status": status, "message": str(e)}
"""


def make_repos(root: Path) -> None:
    files: dict[str, str | bytes] = {
        "org/csv/data.csv": "a,b\n" + "".join(f"{i},x{i}\n" for i in range(10)),
        "org/csv/.hidden/secret.csv": "a\n1\n",
        "org/gz/data.csv.gz": gzip.compress(b"a,b\n1,one\n2,two\n"),
        "org/configs/README.md": CONFIGS_README,
        "org/configs/first/train.csv": "a\n1\n",
        "org/configs/first/test.csv": "a\n2\n",
        "org/configs/second/train.csv": "b\n3\n",
        "canonical/data.csv": "a\n1\n",
    }
    for path, content in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(content if isinstance(content, bytes) else content.encode())
    (root / "org/pq").mkdir()
    pq.write_table(pa.table({"a": range(100), "b": [f"row {i}" for i in range(100)]}), root / "org/pq/data.parquet")
    for label in ["cat", "dog"]:
        (root / f"org/images/train/{label}").mkdir(parents=True)
        for i in range(1, 3):
            Image.new("RGB", (4, 4 + i)).save(root / f"org/images/train/{label}/{i}.png")


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubServer]:
    make_repos(tmp_path / "repos")
    with HubServer(tmp_path / "repos") as server:
        yield server


def run(server: HubServer, code: str, timeout: float = 60) -> Any:
    """Runs `code` with huggingface_hub and datasets online against the server; returns the JSON it printed last."""
    env = {**os.environ, "HF_ENDPOINT": server.url, "HF_HOME": str(server.root.parent / "hf")}
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        env.pop(name, None)
    script = PRELUDE + textwrap.dedent(code)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def fetched(server: HubServer, method: str = "GET") -> list[tuple[str, str | None]]:
    """The (path, Range) of the file requests received."""
    return [(path, headers.get("range")) for m, path, headers in server.requests if m == method and "/resolve/" in path]


def test_dataset_info_sha_follows_the_files(hub: HubServer) -> None:
    sha = hub.revision("org/csv")
    assert len(sha) == 40 and int(sha, 16) >= 0
    code = """
    from huggingface_hub import HfApi
    info = HfApi().dataset_info("org/csv")
    print(json.dumps([info.id, info.sha, [s.rfilename for s in info.siblings], info.private, info.gated]))
    """
    assert run(hub, code) == ["org/csv", sha, ["data.csv"], False, False]  # no hidden file
    with (hub.root / "org/csv/data.csv").open("a") as f:
        f.write("10,x10\n")
    assert hub.revision("org/csv") != sha
    code = f"""
    from huggingface_hub import HfApi
    print(json.dumps([outcome(lambda: HfApi().dataset_info("org/csv", revision=rev).sha) for rev in ("main", "{sha}")]))
    """
    new, old = run(hub, code)
    assert new == {"result": hub.revision("org/csv")}
    assert old["error"] == "huggingface_hub.errors.RevisionNotFoundError" and old["status"] == 404


def test_tree_paths_info_file_system_and_download(hub: HubServer) -> None:
    hub.page_size = 3  # the tree of org/images has 7 entries: 3 pages
    code = """
    from huggingface_hub import HfApi, HfFileSystem, hf_hub_download
    api, fs = HfApi(), HfFileSystem()
    tree = [(e.path, type(e).__name__) for e in api.list_repo_tree("org/images", repo_type="dataset", recursive=True)]
    infos = api.get_paths_info("org/images", ["train/cat", "train/dog/2.png", "nope"], repo_type="dataset")
    with fs.open("datasets/org/csv/data.csv", block_size=8) as f:
        f.seek(4)
        head = f.read(3).decode()
    missing = outcome(lambda: hf_hub_download("org/csv", "nope.csv", repo_type="dataset"))
    print(json.dumps({
        "tree": tree,
        "infos": [(e.path, getattr(e, "size", None)) for e in infos],
        "glob": fs.glob("datasets/org/images/**/*.png"),
        "head": head,
        "download": open(hf_hub_download("org/gz", "data.csv.gz", repo_type="dataset"), "rb").read().hex(),
        "missing": missing["error"],
    }))
    """
    out = run(hub, code)
    assert out["tree"] == [
        ["train", "RepoFolder"],
        ["train/cat", "RepoFolder"],
        ["train/cat/1.png", "RepoFile"],
        ["train/cat/2.png", "RepoFile"],
        ["train/dog", "RepoFolder"],
        ["train/dog/1.png", "RepoFile"],
        ["train/dog/2.png", "RepoFile"],
    ]
    tree_requests = [path for _, path, _ in hub.requests if path.startswith("/api/datasets/org/images/tree/main?")]
    assert [path.partition("cursor=")[2] for path in tree_requests[:3]] == ["", "3", "6"]  # then HfFileSystem's
    assert out["infos"] == [
        ["train/cat", None],
        ["train/dog/2.png", (hub.root / "org/images/train/dog/2.png").stat().st_size],
    ]
    assert out["glob"] == [f"datasets/org/images/train/{label}/{i}.png" for label in ("cat", "dog") for i in (1, 2)]
    assert out["head"] == "0,x"
    assert ("/datasets/org/csv/resolve/main/data.csv", "bytes=4-14") in fetched(hub)  # 3 bytes + 8 of readahead
    assert bytes.fromhex(out["download"]) == (hub.root / "org/gz/data.csv.gz").read_bytes()
    assert out["missing"] == "huggingface_hub.errors.RemoteEntryNotFoundError"


def test_config_and_split_names(hub: HubServer) -> None:
    code = """
    import datasets
    print(json.dumps([
        datasets.get_dataset_config_names("org/configs"),
        datasets.get_dataset_split_names("org/configs", "first"),
        datasets.get_dataset_split_names("org/configs", "second"),
    ]))
    """
    assert run(hub, code) == [["first", "second"], ["train", "test"], ["train"]]


@pytest.mark.parametrize(
    ("repo", "rows"),
    [
        ("org/csv", [{"a": 0, "b": "x0"}, {"a": 1, "b": "x1"}]),
        ("org/pq", [{"a": 0, "b": "row 0"}, {"a": 1, "b": "row 1"}]),
        ("org/gz", [{"a": 1, "b": "one"}, {"a": 2, "b": "two"}]),
    ],
)
def test_streaming_first_rows(hub: HubServer, repo: str, rows: list[dict[str, Any]]) -> None:
    code = f"""
    import datasets
    print(json.dumps(list(datasets.load_dataset("{repo}", split="train", streaming=True).take(2))))
    """
    assert run(hub, code) == rows
    sha, (file,) = hub.revision(repo), hub.files(repo)
    assert {path for path, _ in fetched(hub)} == {f"/datasets/{repo}/resolve/{sha}/{file}"}  # Parquet: twice


def test_streaming_image_folder(hub: HubServer) -> None:
    # In datasets 5.2.0, a streamed image is still decoded after .cast_column("image", Image(decode=False)):
    # `.decode(False)` gives the undecoded {"path", "bytes"} (without fetching the image); decoding them needs Pillow.
    code = """
    import datasets
    ds = datasets.load_dataset("org/images", split="train", streaming=True)
    undecoded = [row["image"]["path"] for row in ds.decode(False).take(4)]
    decoded = [[row["label"], list(row["image"].size)] for row in ds.take(4)]
    print(json.dumps([ds.features["label"].names, undecoded, sorted(decoded)]))
    """
    labels, undecoded, decoded = run(hub, code)
    sha = hub.revision("org/images")
    assert labels == ["cat", "dog"]
    assert sorted(undecoded) == [
        f"hf://datasets/org/images@{sha}/train/{label}/{i}.png" for label in labels for i in (1, 2)
    ]
    assert decoded == [[0, [4, 5]], [0, [4, 6]], [1, [4, 5]], [1, [4, 6]]]
    assert sorted(path for path, _ in fetched(hub)) == [
        f"/datasets/org/images/resolve/{sha}/train/{label}/{i}.png" for label in labels for i in (1, 2)
    ]


def test_streaming_reads_only_the_start_of_a_large_csv(hub: HubServer) -> None:
    big = hub.root / "org/big/big.csv"
    big.parent.mkdir()
    big.write_text("id,text\n" + "".join(f"{i},{'lorem ipsum ' * 8}{i}\n" for i in range(200_000)))
    size = big.stat().st_size
    assert size > 20_000_000
    code = """
    import datasets
    print(json.dumps([row["id"] for row in datasets.load_dataset("org/big", split="train", streaming=True).take(3)]))
    """
    assert run(hub, code) == [0, 1, 2]
    ((path, range_header),) = fetched(hub)
    assert path.endswith("/big.csv") and range_header is not None and range_header.startswith("bytes=0-")
    assert 0 < hub.bytes_sent["org/big/big.csv"] < size / 3  # one 5 MiB fsspec block (+ readahead), of 20 MB


def test_missing(hub: HubServer) -> None:
    hub.modes["org/csv"] = "missing"
    code = """
    import datasets
    from huggingface_hub import HfApi
    print(json.dumps([
        outcome(lambda: HfApi().dataset_info("org/csv")),
        outcome(lambda: HfApi().dataset_info("org/nothing")),
        outcome(lambda: datasets.get_dataset_config_names("org/csv")),
    ]))
    """
    missing, nothing, configs = run(hub, code)
    assert missing["error"] == nothing["error"] == "huggingface_hub.errors.RepositoryNotFoundError"
    assert missing["status"] == nothing["status"] == 404
    assert configs["error"] == "datasets.exceptions.DatasetNotFoundError"
    assert configs["message"] == "Dataset 'org/csv' doesn't exist on the Hub or cannot be accessed."


def test_gated(hub: HubServer) -> None:
    hub.modes["org/configs"] = "gated"
    code = """
    import datasets
    from huggingface_hub import HfApi, hf_hub_download
    info = HfApi().dataset_info("org/configs")
    download = lambda token: hf_hub_download("org/configs", "first/train.csv", repo_type="dataset", token=token)
    print(json.dumps([
        [info.gated, info.sha],
        outcome(lambda: hf_hub_download("org/configs", "README.md", repo_type="dataset") and "ok"),
        outcome(lambda: download(None)),
        outcome(lambda: download("hf_wrong")),
        outcome(lambda: datasets.get_dataset_config_names("org/configs")),
        outcome(lambda: open(download("hf_test_token")).read()),
        outcome(lambda: list(datasets.load_dataset("org/configs", "first", split="train", streaming=True,
                                                   token="hf_test_token"))),
    ]))
    """
    info, readme, anonymous, wrong_token, configs, with_token, rows = run(hub, code)
    assert info == ["auto", hub.revision("org/configs")]  # as on the Hub: the repo info and README are public
    assert readme == {"result": "ok"}
    assert anonymous["error"] == wrong_token["error"] == "huggingface_hub.errors.GatedRepoError"
    assert (anonymous["status"], wrong_token["status"]) == (401, 403)
    assert configs["error"] == "datasets.exceptions.DatasetNotFoundError"
    assert (
        configs["message"]
        == "Dataset 'org/configs' is a gated dataset on the Hub. You must be authenticated to access it."
    )
    assert with_token == {"result": "a\n1\n"} and rows == {"result": [{"a": 1}]}
    assert any(headers.get("authorization") == "Bearer hf_test_token" for _, _, headers in hub.requests)


def test_private(hub: HubServer) -> None:
    hub.mode, hub.token = "private", "hf_other_token"
    code = """
    import datasets
    from huggingface_hub import HfApi
    print(json.dumps([
        outcome(lambda: HfApi().dataset_info("org/csv")),
        outcome(lambda: datasets.get_dataset_config_names("org/csv")),
        outcome(lambda: HfApi().dataset_info("org/csv", token="hf_other_token").private),
        outcome(lambda: list(datasets.load_dataset("org/csv", split="train", streaming=True,
                                                   token="hf_other_token").take(1))),
    ]))
    """
    anonymous, configs, private, rows = run(hub, code)
    assert anonymous["error"] == "huggingface_hub.errors.RepositoryNotFoundError" and anonymous["status"] == 401
    assert configs["error"] == "datasets.exceptions.DatasetNotFoundError"
    assert configs["message"] == "Dataset 'org/csv' doesn't exist on the Hub or cannot be accessed."
    assert private == {"result": True} and rows == {"result": [{"a": 0, "b": "x0"}]}


def test_error(hub: HubServer) -> None:
    # Only a call huggingface_hub does not retry: the file and tree requests are retried 5 times (~23 s of backoff).
    hub.modes["org/csv"] = "error"
    code = """
    from huggingface_hub import HfApi
    print(json.dumps([outcome(lambda: HfApi().dataset_info(repo).sha) for repo in ("org/csv", "org/gz")]))
    """
    error, other = run(hub, code)
    assert error["error"] == "huggingface_hub.errors.HfHubHTTPError" and error["status"] == 500
    assert other == {"result": hub.revision("org/gz")}


def test_hang_times_the_client_out_and_does_not_block_the_shutdown(tmp_path: Path) -> None:
    make_repos(tmp_path / "repos")
    with HubServer(tmp_path / "repos") as hub:
        hub.modes["org/csv"] = "hang"
        code = """
        import time
        from huggingface_hub import HfApi
        started = time.monotonic()
        print(json.dumps([outcome(lambda: HfApi().dataset_info("org/csv", timeout=1)), time.monotonic() - started]))
        """
        hanging, elapsed = run(hub, code)
        assert "Timeout" in hanging["error"] and 1 <= elapsed < 5
        assert [path for _, path, _ in hub.requests] == ["/api/datasets/org/csv"]  # it still hangs in the server
        # And in this process: a request that hangs, and a kept-alive idle connection.
        kept_alive = http.client.HTTPConnection(hub.url.removeprefix("http://"), timeout=10)
        kept_alive.request("GET", "/api/datasets/org/gz")
        assert kept_alive.getresponse().read()
        hanging_connection = http.client.HTTPConnection(hub.url.removeprefix("http://"), timeout=10)
        hanging_connection.request("GET", "/api/datasets/org/csv")
        outcomes: list[str] = []
        waiting = threading.Thread(
            target=lambda: outcomes.append(type(_error(hanging_connection.getresponse)).__name__)
        )
        waiting.start()
        deadline = time.monotonic() + 5
        while [path for _, path, _ in hub.requests].count("/api/datasets/org/csv") < 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # until the server has it
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 2
    waiting.join(2)
    assert outcomes == ["RemoteDisconnected"]  # closed without an answer
    with pytest.raises(OSError):  # the server is gone
        kept_alive.request("GET", "/api/datasets/org/gz")
        kept_alive.getresponse()


def _error(call: Any) -> BaseException | None:
    try:
        call()
    except BaseException as e:
        return e
    return None


def test_http(hub: HubServer) -> None:
    """What the libraries rely on, over raw HTTP."""
    connection = http.client.HTTPConnection(hub.url.removeprefix("http://"), timeout=5)

    def request(method: str, path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()

    data, sha = (hub.root / "org/csv/data.csv").read_bytes(), hub.revision("org/csv")
    status, headers, body = request("HEAD", "/datasets/org/csv/resolve/main/data.csv")
    assert (status, body, headers["Content-Length"], headers["X-Repo-Commit"]) == (200, b"", str(len(data)), sha)
    assert headers["ETag"] == f'"{hub.blob_id(hub.root / "org/csv/data.csv")}"'
    status, headers, body = request("GET", f"/datasets/org/csv/resolve/{sha}/data.csv", Range="bytes=4-7")
    assert (status, body, headers["Content-Range"]) == (206, data[4:8], f"bytes 4-7/{len(data)}")
    assert request("GET", "/datasets/org/csv/resolve/main/data.csv", Range="bytes=-5")[2] == data[-5:]
    assert request("GET", "/datasets/org/csv/resolve/main/data.csv", Range=f"bytes={len(data)}-")[0] == 416
    assert request("GET", "/datasets/canonical/resolve/main/data.csv")[2] == b"a\n1\n"
    assert json.loads(request("GET", "/api/datasets/canonical")[2])["id"] == "canonical"
    for path in ["org/csv/.hidden/secret.csv", "org/csv/..%2Fgz%2Fdata.csv.gz", "org/csv/../gz/data.csv.gz"]:
        status, headers, _ = request("GET", f"/datasets/{path.replace('org/csv/', 'org/csv/resolve/main/', 1)}")
        assert (status, headers["X-Error-Code"]) == (404, "EntryNotFound"), path
    status, headers, _ = request("GET", "/api/datasets/org/csv/revision/0123456789012345678901234567890123456789")
    assert (status, headers["X-Error-Code"]) == (404, "RevisionNotFound")
    assert hub.bytes_sent["org/csv/data.csv"] == 4 + 5 + 0  # the HEAD and the 416 sent no file bytes
    connection.close()
