"""Who may read what, over real HTTP: JWTs of gated datasets, operator keys and signatures, signed asset
URLs, and the webhook's secret. Every refusal is checked to have written nothing."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from common import cache
from common.assets import CellLocation, store_image
from common.config import get_config
from tasks import samples
from tasks.api.assets import expiry, url_signer
from tasks.api.auth import sign_request
from tasks.queue import get_queue
from tests.api_server import api_client
from tests.conftest import Stores
from tests.test_api import get_until_ready
from tests.test_pipeline import use_pipeline_settings, wait_until_settled

AUDIENCE = "stepcache-tests"
OPERATOR_KEY = "operator-key-0123456789"
OPERATOR_SECRET = "operator-secret-0123456789"
WEBHOOK_SECRET = "webhook-secret-0123456789"
ASSETS_KEY = "assets-key-0123456789abcdef"
PRIVATE_KEY = ed25519.Ed25519PrivateKey.generate()
PUBLIC_PEM = (
    PRIVATE_KEY.public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode()
)


@pytest.fixture
def mirror(stores: Stores, default_graph: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    root = tmp_path / "mirror"
    root.mkdir()
    use_pipeline_settings(
        monkeypatch,
        tmp_path,
        f"file://{root}",
        API_JWT_PUBLIC_KEY=PUBLIC_PEM.replace("\n", "\\n"),  # one line, as an environment variable often is
        API_JWT_ALGORITHM="EdDSA",
        API_JWT_AUDIENCE=AUDIENCE,
        API_OPERATOR_KEY=OPERATOR_KEY,
        API_OPERATOR_SECRET=OPERATOR_SECRET,
        API_WEBHOOK_SECRET=WEBHOOK_SECRET,
        API_ASSETS_SIGNING_KEY=ASSETS_KEY,
        API_ACCESS_CACHE_SECONDS="0",
    )
    return root


@pytest.fixture
def client(mirror: Path) -> Iterator[httpx.Client]:
    with api_client() as client:
        yield client


def token(dataset: str, key: Any = PRIVATE_KEY, algorithm: str = "EdDSA", **claims: Any) -> str:
    payload = {"sub": f"datasets/{dataset}", "aud": AUDIENCE, "exp": int(time.time()) + 300, **claims}
    return jwt.encode({name: value for name, value in payload.items() if value is not None}, key, algorithm=algorithm)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    return ".".join([_b64(json.dumps(header).encode()), _b64(json.dumps(payload).encode()), _b64(signature)])


def test_a_gated_dataset_needs_a_valid_jwt_for_it(client: httpx.Client, mirror: Path, celery_worker: object) -> None:
    dataset = samples.csv_dataset(mirror, "org/gated")
    (mirror / dataset / ".gated").write_text("")
    params = {"dataset": dataset, "config": "default", "split": "train"}
    good = token(dataset)
    answers = get_until_ready(client, "/first-rows", headers={"Authorization": f"Bearer {good}"}, **params)
    assert answers[-1].status_code == 200 and answers[-1].headers["Cache-Control"].startswith("private")
    job_id = get_queue().jobs(dataset)[0].job_id
    producing = f"/jobs/for/split-first-rows?dataset={dataset}&config=default&split=train"
    for path in (f"/jobs/{job_id}", f"/jobs/{job_id}/events", producing):
        assert client.get(path).status_code == 401
        assert client.get(path, headers={"Authorization": f"Bearer {token('org/other')}"}).status_code == 404
    assert client.get(f"/jobs/{job_id}", headers={"Authorization": f"Bearer {good}"}).json()["dataset"] == dataset
    header, payload, signature = good.split(".")
    claims = {"sub": f"datasets/{dataset}", "aud": AUDIENCE, "exp": int(time.time()) + 300}
    hs256 = {"alg": "HS256", "typ": "JWT"}
    signing_input = f"{_b64(json.dumps(hs256).encode())}.{_b64(json.dumps(claims).encode())}".encode()
    hs256_with_the_public_key = forged(
        hs256, claims, hmac.new(PUBLIC_PEM.encode(), signing_input, hashlib.sha256).digest()
    )
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    refused = {
        "missing": (None, 401),
        "not a bearer": ("Basic dXNlcjpwYXNz", 401),
        "garbage": ("Bearer not.a.token", 401),
        "expired": (f"Bearer {token(dataset, exp=int(time.time()) - 60)}", 401),
        "no expiry": (f"Bearer {token(dataset, exp=None)}", 401),
        "wrong audience": (f"Bearer {token(dataset, aud='someone-else')}", 401),
        "no audience": (f"Bearer {token(dataset, aud=None)}", 401),
        "alg none": (f"Bearer {forged({'alg': 'none', 'typ': 'JWT'}, claims)}", 401),
        "HS256 signed with the public key": (f"Bearer {hs256_with_the_public_key}", 401),
        "RS256 from another key": (f"Bearer {token(dataset, other_key, 'RS256')}", 401),
        "EdDSA from another key": (f"Bearer {token(dataset, ed25519.Ed25519PrivateKey.generate())}", 401),
        "tampered payload": (f"Bearer {header}.{_b64(json.dumps({**claims, 'exp': 2**40}).encode())}.{signature}", 401),
        "tampered signature": (f"Bearer {header}.{payload}.{signature[:-4]}AAAA", 401),
        "another dataset": (f"Bearer {token('org/other')}", 404),  # the viewer's: as if it did not exist
    }
    for name, (authorization, status) in refused.items():
        headers = {"Authorization": authorization} if authorization else {}
        answer = client.get("/first-rows", params=params, headers=headers)
        assert answer.status_code == status, (name, answer.text)
        expected = "ExternalAuthenticatedError" if status == 404 else "ExternalUnauthenticatedError"
        assert answer.json()["error_code"] == expected, name
        assert "rows" not in answer.json() and "Traceback" not in answer.text
        # The same bytes as for a dataset that does not exist: nothing tells one from the other.
        missing = client.get("/first-rows", params={**params, "dataset": "org/nothing"}, headers=headers)
        assert (missing.status_code, missing.content) == (answer.status_code, answer.content), name
    # A public dataset needs no token, and a token does not make it private.
    public = samples.jsonl_dataset(mirror)
    answer = get_until_ready(client, "/splits", dataset=public, config="default")[-1]
    assert answer.status_code == 200 and answer.headers["Cache-Control"].startswith("public")


def operator_answer(
    client: httpx.Client, method: str, target: str, headers: dict[str, str], body: bytes = b""
) -> httpx.Response:
    return client.request(method, target, headers={"Content-Type": "application/json", **headers}, content=body)


def test_operator_endpoints_need_the_key_or_a_fresh_signature_seen_once(client: httpx.Client, stores: Stores) -> None:
    queue = get_queue()
    target, body = "/admin/limits/org", json.dumps({"limit": 3}).encode()
    signed = sign_request(OPERATOR_SECRET, "PUT", target, body)
    refusals = {
        "nothing": {},
        "wrong key": {"Authorization": "Bearer not-the-key-at-all"},
        "the secret as a key": {"Authorization": f"Bearer {OPERATOR_SECRET}"},
        "stale": sign_request(OPERATOR_SECRET, "PUT", target, body, now=time.time() - 3600),
        "from the future": sign_request(OPERATOR_SECRET, "PUT", target, body, now=time.time() + 3600),
        "another secret": sign_request("another-secret-0123456789", "PUT", target, body),
        "another method": sign_request(OPERATOR_SECRET, "POST", target, body),
        "another path": sign_request(OPERATOR_SECRET, "PUT", "/admin/limits/other", body),
        "another body": sign_request(OPERATOR_SECRET, "PUT", target, json.dumps({"limit": 0}).encode()),
        "no timestamp": {"X-Stepcache-Signature": signed["X-Stepcache-Signature"]},
        "bad timestamp": {**signed, "X-Stepcache-Timestamp": "yesterday"},
        "huge timestamp": {**signed, "X-Stepcache-Timestamp": "9" * 400},
        "another nonce": {**signed, "X-Stepcache-Nonce": "0" * 32},
        "bad nonce": {**signed, "X-Stepcache-Nonce": "a b"},
    }
    for name, headers in refusals.items():
        answer = operator_answer(client, "PUT", target, headers, body)
        assert answer.status_code == 401, (name, answer.text)
        assert answer.json()["error_code"] == "AuthenticationRequiredError"
        assert queue.get_limit("org") == (get_config().queue.max_jobs_per_namespace, False), name
    assert operator_answer(client, "PUT", target, signed, body).status_code == 200
    assert queue.get_limit("org") == (3, True)
    queue.set_limit("org", None)
    replayed = operator_answer(client, "PUT", target, signed, body)
    assert replayed.status_code == 401 and "replayed" in replayed.json()["error"]
    assert queue.get_limit("org") == (get_config().queue.max_jobs_per_namespace, False)
    # The same request signed twice in the same second: two nonces, two requests.
    for _ in range(2):
        assert operator_answer(
            client, "PUT", target, sign_request(OPERATOR_SECRET, "PUT", target, body), body
        ).is_success
    # With the key: pause, read, resume.
    key = {"Authorization": f"Bearer {OPERATOR_KEY}"}
    assert operator_answer(client, "POST", "/admin/limits/org/pause", key).status_code == 200
    assert client.get("/admin/limits", headers=key).json()["namespaces"]["org"]["limit"] == 0
    assert operator_answer(client, "DELETE", "/admin/limits/org", key).status_code == 200
    assert queue.get_limit("org")[1] is False
    assert client.get("/admin/limits").status_code == 401


def test_force_refresh_and_cancel_by_the_operator(client: httpx.Client, mirror: Path) -> None:
    dataset = samples.csv_dataset(mirror)
    key = {"Authorization": f"Bearer {OPERATOR_KEY}"}
    get_queue().set_limit("org", 0)
    refreshed = operator_answer(client, "POST", f"/admin/refresh?dataset={dataset}", key)
    assert refreshed.status_code == 200 and len(refreshed.json()["jobs"]) == 1
    assert [job.step for job in get_queue().jobs(dataset)] == ["dataset-config-names"]
    cancelled = operator_answer(client, "POST", f"/admin/cancel?dataset={dataset}", key)
    assert cancelled.json()["cancelled"] == refreshed.json()["jobs"]
    assert operator_answer(client, "POST", "/admin/refresh?dataset=../x", key).status_code == 422


def test_asset_urls_are_signed_and_expire_and_no_path_leaves_the_storage(
    client: httpx.Client, mirror: Path, celery_worker: object, tmp_path: Path
) -> None:
    dataset = samples.image_dataset(mirror)
    answer = get_until_ready(client, "/first-rows", dataset=dataset, config="default", split="train")[-1]
    absolute = answer.json()["rows"][0]["row"]["image"]["src"]  # an absolute URL, as the viewer's
    assert absolute.startswith(f"{client.base_url}/assets/")
    source = absolute.removeprefix(f"{client.base_url}/")
    url = httpx.URL(source)
    assert url.params["signature"] and int(url.params["expires"]) > time.time()
    image = client.get(absolute)
    assert image.status_code == 200 and image.content[:3] == b"\xff\xd8\xff"  # a JPEG
    path, expires = source.split("?")[0].removeprefix("assets/"), int(url.params["expires"])
    storage = get_config().assets.storage_path

    def signed(path: str, expires: int = expires) -> dict[str, str]:
        digest = hmac.new(ASSETS_KEY.encode(), f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()
        return {"expires": str(expires), "signature": digest}

    assert client.get(f"/assets/{path}", params=signed(path)).status_code == 200
    outside = tmp_path / "secret.txt"
    outside.write_text("TOP SECRET CONTENT")
    (storage / dataset / "link.jpg").symlink_to(outside)
    (storage / dataset / "linkdir").symlink_to(tmp_path, target_is_directory=True)
    refused = {
        "no signature": ("/assets/" + path, {}, 403),
        "tampered signature": ("/assets/" + path, {**signed(path), "signature": "0" * 64}, 403),
        "another path's signature": ("/assets/" + path, signed(path + "x"), 403),
        "expired": ("/assets/" + path, signed(path, int(time.time()) - 1), 403),
        "dot dot": (f"/assets/{dataset}/../../secret.txt", signed(f"{dataset}/../../secret.txt"), 404),
        "encoded dot dot": (f"/assets/{dataset}/%2e%2e/%2e%2e/secret.txt", signed(f"{dataset}/../../secret.txt"), 404),
        "absolute": (f"/assets/{outside}", signed(str(outside)), 404),
        "double slash": (f"/assets//{outside}", signed(f"/{outside}"), 404),
        "symlinked file": (f"/assets/{dataset}/link.jpg", signed(f"{dataset}/link.jpg"), 404),
        "symlinked directory": (f"/assets/{dataset}/linkdir/secret.txt", signed(f"{dataset}/linkdir/secret.txt"), 404),
        "a directory": (f"/assets/{dataset}", signed(dataset), 404),
    }
    for name, (target, params, status) in refused.items():
        answered, body = raw_get(client, target + "?" + urlencode(params))
        assert answered == status, (name, answered, body)
        assert b"TOP SECRET" not in body, name
    assert outside.read_text() == "TOP SECRET CONTENT"
    # A dataset's cell that looks like an asset of another dataset is data: never signed (no signing oracle).
    thief = "thief/data"
    samples.write(mirror / thief / "train.jsonl", json.dumps({"picture": {"src": "assets/" + path}}) + "\n")
    stolen = get_until_ready(client, "/first-rows", dataset=thief, config="default", split="train")[-1]
    assert stolen.json()["rows"][0]["row"]["picture"]["src"] == "assets/" + path
    # Names that need percent-encoding in a URL.
    revision = path.split("/--/")[1]
    for config in ("pct%41", "h#sh", "sp ace"):
        location = CellLocation(dataset, revision, config, "train", 0, "image", 0)
        stored = store_image(location, (next((mirror / dataset).rglob("*.png"))).read_bytes())["src"]
        assert isinstance(stored, str)
        signed_url = url_signer(get_config(), expiry(3600), dataset)(stored)
        assert client.get("/" + signed_url).status_code == 200, (config, signed_url)


def raw_get(client: httpx.Client, target: str) -> tuple[int, bytes]:
    """GET exactly this request target (an HTTP client would normalize `..` and `//` away)."""
    connection = http.client.HTTPConnection(client.base_url.host, client.base_url.port, timeout=30)
    try:
        connection.request("GET", target)
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def webhook(
    client: httpx.Client, action: str, dataset: str, secret: str = WEBHOOK_SECRET, **more: Any
) -> httpx.Response:
    payload = {"event": {"action": action, "scope": "repo"}, "repo": {"type": "dataset", "name": dataset}, **more}
    return client.post("/webhook", json=payload, headers={"X-Webhook-Secret": secret})


def test_the_webhook_updates_deletes_and_moves_a_dataset(
    client: httpx.Client, mirror: Path, celery_worker: object
) -> None:
    dataset = samples.image_dataset(mirror)
    assert webhook(client, "update", dataset).json()["enqueued"] == 1  # the first step; the others follow
    before = wait_until_settled(dataset)
    assert before[("split-first-rows", "default", "train")].is_success
    # A canonical dataset named like the namespace: its delete spares the namespace's datasets.
    assets = sorted((get_config().assets.storage_path / dataset).rglob("*.jpg"))
    assert webhook(client, "delete", "org").json()["deleted"] == 0
    assert sorted((get_config().assets.storage_path / dataset).rglob("*.jpg")) == assets and assets
    # A move to its own name is refused, and changes nothing.
    assert webhook(client, "move", dataset, movedTo={"name": dataset}).status_code == 422
    assert len(cache.get_dataset_responses(dataset)) == len(before)
    # Refused: no secret, a wrong one; nothing happens.
    for secret in ("", "wrong-secret-0123456789"):
        assert webhook(client, "delete", dataset, secret).status_code == 401
    assert len(cache.get_dataset_responses(dataset)) == len(before)
    # An update at a new revision computes the entries again.
    image = next((mirror / dataset / "train").rglob("*.png"))
    samples.write(image.with_name("new.png"), image.read_bytes())
    time.sleep(1.1)  # the mirror's revision is kept 1 s
    assert webhook(client, "update", dataset).json()["enqueued"] > 0
    after = wait_until_settled(dataset)
    first_rows = after[("split-first-rows", "default", "train")]
    assert first_rows.dataset_git_revision != before[("split-first-rows", "default", "train")].dataset_git_revision
    assert len(first_rows.content["rows"]) == len(before[("split-first-rows", "default", "train")].content["rows"]) + 1
    # A move: entries, names inside them and assets under the new name.
    (mirror / dataset).rename(mirror / "org" / "renamed")  # as the Hub renames the repository
    moved = webhook(client, "move", dataset, movedTo={"name": "org/renamed"})
    assert moved.status_code == 200 and moved.json()["moved"] == len(after)
    assert moved.json()["enqueued"] == 0  # the same files: every entry moved is up to date
    assert cache.get_dataset_responses(dataset) == []
    answer = get_until_ready(client, "/first-rows", dataset="org/renamed", config="default", split="train")[-1]
    source = answer.json()["rows"][0]["row"]["image"]["src"]
    assert source.startswith(f"{client.base_url}/assets/org/renamed/--/") and client.get(source).status_code == 200
    names = client.get("/splits", params={"dataset": "org/renamed", "config": "default"}).json()
    assert {split["dataset"] for split in names["splits"]} == {"org/renamed"}
    # A delete: entries, assets and Parquet files gone.
    deleted = webhook(client, "delete", "org/renamed")
    assert deleted.status_code == 200 and deleted.json()["deleted"] > 0
    assert cache.get_dataset_responses("org/renamed") == []
    assert not (get_config().assets.storage_path / "org" / "renamed").exists()
    assert not (get_config().worker.parquet_path / "org" / "renamed").exists()
    assert client.get("/" + source).status_code == 404
    assert (
        webhook(client, "update", "org/model", repo={"type": "model", "name": "org/model"}).json()["status"]
        == "ignored"
    )
    assert os.environ.get("API_WEBHOOK_SECRET") == WEBHOOK_SECRET
