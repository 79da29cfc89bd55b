"""The API in front of a Hub (the local Hub-compatible server): gated datasets, and a Hub outage."""

from __future__ import annotations

import time

import pytest

from tests import formats
from tests.api_server import api_client
from tests.conftest import use_settings
from tests.hub_server import HubServer
from tests.test_api import get_until_ready
from tests.test_api_auth import AUDIENCE, PUBLIC_PEM, token
from tests.test_hub import SECRET, hub

__all__ = ["hub"]  # a fixture: the local Hub, the pipeline's settings pointed at it


def test_a_gated_hub_dataset_and_a_hub_outage(
    hub: HubServer, celery_worker: object, default_graph: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_settings(
        monkeypatch,
        {
            "COMMON_HF_TOKEN": SECRET,  # the workers read the gated dataset with the server's token
            "API_JWT_PUBLIC_KEY": PUBLIC_PEM,
            "API_JWT_AUDIENCE": AUDIENCE,
            "API_ACCESS_CACHE_SECONDS": "0.5",
        },
    )
    public, gated = formats.csv_repo(hub.root), formats.jsonl_repo(hub.root)
    hub.modes[gated] = "gated"
    with api_client() as client:
        assert get_until_ready(client, "/splits", dataset=public, config="default")[-1].status_code == 200
        assert client.get("/splits", params={"dataset": gated, "config": "default"}).status_code == 401
        authorized = {"Authorization": f"Bearer {token(gated)}"}
        answer = get_until_ready(client, "/splits", headers=authorized, dataset=gated, config="default")[-1]
        assert answer.status_code == 200 and answer.headers["Cache-Control"].startswith("private")
        # The Hub goes down: what is cached is still served, with the access the Hub gave last.
        hub.mode = "error"
        time.sleep(0.6)  # past API_ACCESS_CACHE_SECONDS
        started = time.monotonic()
        assert client.get("/splits", params={"dataset": public, "config": "default"}).status_code == 200
        assert client.get("/splits", params={"dataset": gated, "config": "default"}).status_code == 401
        assert client.get("/splits", params={"dataset": gated, "config": "default"}, headers=authorized).is_success
        unknown = client.get("/splits", params={"dataset": "fmt/unknown", "config": "default"})
        assert unknown.status_code in (502, 503), unknown.text
        assert unknown.json()["error_code"] in ("HubTransientError", "HubUnavailableError")
        assert time.monotonic() - started < 30
