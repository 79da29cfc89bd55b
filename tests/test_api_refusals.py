"""docs/http-api.md's claims about refusals, one test each, over real HTTP: a signed asset URL cut short is
403 like a tampered one; a path with a `..` part is 404, signed or not; operator endpoints without a key
or a secret set say that they are off."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest

from common.config import get_config
from tasks.api.assets import signature
from tests.api_server import api_client
from tests.conftest import Stores, use_settings
from tests.test_api_auth import raw_get

ASSETS_KEY = "assets-key-0123456789abcdef"
ASSET = "org/ds/--/0123abcd/default/train/0/image/0.jpg"
SIGNATURE_ERRORS = {"MissingSignatureError", "InvalidSignatureError", "ExpiredSignatureError"}


@pytest.fixture
def storage(stores: Stores, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    root = tmp_path / "assets"
    use_settings(monkeypatch, {"ASSETS_STORAGE_DIRECTORY": str(root), "API_ASSETS_SIGNING_KEY": ASSETS_KEY})
    (root / ASSET).parent.mkdir(parents=True)
    (root / ASSET).write_bytes(b"\xff\xd8\xff an image")
    (tmp_path / "secret.txt").write_text("TOP SECRET CONTENT")
    return root


@pytest.fixture
def client(storage: Path) -> Iterator[httpx.Client]:
    with api_client() as client:
        yield client


def signed(path: str, expires: int | None = None) -> dict[str, str]:
    expires = expires or int(time.time()) + 600
    return {"expires": str(expires), "signature": signature(ASSETS_KEY.encode(), path, expires)}


def test_an_asset_url_without_its_signature_is_403_like_a_tampered_one(client: httpx.Client) -> None:
    url = f"/assets/{ASSET}"
    assert client.get(url, params=signed(ASSET)).status_code == 200
    refused = {
        "nothing": {},
        "no signature": {"expires": signed(ASSET)["expires"]},
        "no expiry": {"signature": signed(ASSET)["signature"]},
        "empty signature": {**signed(ASSET), "signature": ""},
        "tampered": {**signed(ASSET), "signature": "0" * 64},
        "expired": signed(ASSET, int(time.time()) - 1),
    }
    for name, params in refused.items():
        answer = client.get(url, params=params)
        assert answer.status_code == 403, (name, answer.text)
        assert answer.json()["error_code"] in SIGNATURE_ERRORS, name
        assert answer.content[:3] != b"\xff\xd8\xff", name
    assert client.get(url).json()["error_code"] == "MissingSignatureError"


def test_a_path_with_a_dot_dot_part_is_404_signed_or_not(client: httpx.Client, storage: Path) -> None:
    escape = "org/ds/--/../../../../secret.txt"
    assert (storage / escape).resolve().read_text() == "TOP SECRET CONTENT"  # what the path would reach
    for raw_path in (escape, escape.replace("..", "%2e%2e"), "org/ds/--/0123abcd/../0123abcd/default/x.jpg"):
        for name, params in {
            "unsigned": {},
            "wrongly signed": {**signed(escape), "signature": "0" * 64},
            "signed": signed(raw_path.replace("%2e%2e", "..")),
            "expired": signed(escape, int(time.time()) - 1),
        }.items():
            status, body = raw_get(client, f"/assets/{raw_path}?{urlencode(params)}")
            assert status == 404, (raw_path, name, status, body)
            assert b"TOP SECRET" not in body


def test_the_operator_endpoints_say_they_are_off_when_neither_key_nor_secret_is_set(
    client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = get_config().api
    assert not settings.operator_key.get_secret_value() and not settings.operator_secret.get_secret_value()
    for headers in ({}, {"Authorization": "Bearer some-guessed-key-0123456789"}):
        answer = client.get("/admin/limits", headers=headers)
        assert answer.status_code == 401 and answer.json()["error_code"] == "AuthenticationRequiredError"
        message = answer.json()["error"]
        assert "off" in message and "API_OPERATOR_KEY" in message and "API_OPERATOR_SECRET" in message


def test_with_an_operator_key_set_a_refusal_does_not_say_off(stores: Stores, monkeypatch: pytest.MonkeyPatch) -> None:
    use_settings(monkeypatch, {"API_OPERATOR_KEY": "operator-key-0123456789"})
    with api_client() as client:
        refused = client.get("/admin/limits", headers={"Authorization": "Bearer wrong-key-0123456789"})
        assert refused.status_code == 401 and "off" not in refused.json()["error"]
        allowed = client.get("/admin/limits", headers={"Authorization": "Bearer operator-key-0123456789"})
        assert allowed.status_code == 200
