"""Schemathesis runs every operation of the API's OpenAPI document with generated input, over real HTTP:
no 500 unless it is a cached error, never a traceback, and every error as `{error, error_code}`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from common.exceptions import CacheableError
from tests.api_server import api_server
from tests.conftest import Stores
from tests.test_pipeline import use_pipeline_settings

OPERATOR_KEY = "schema-operator-key-0123"
WEBHOOK_SECRET = "schema-webhook-secret-0123"
EXAMPLES = 60


def _cacheable_codes() -> set[str]:
    codes, classes = set(), [CacheableError]
    while classes:
        current = classes.pop()
        codes.add(current.error_code)
        classes += current.__subclasses__()
    return codes


@pytest.fixture
def api_url(stores: Stores, default_graph: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    (tmp_path / "mirror").mkdir()
    use_pipeline_settings(
        monkeypatch,
        tmp_path,
        f"file://{tmp_path / 'mirror'}",
        API_OPERATOR_KEY=OPERATOR_KEY,
        API_WEBHOOK_SECRET=WEBHOOK_SECRET,
        API_REQUEST_TIMEOUT_SECONDS="20",
    )
    with api_server() as url:
        yield url


def check(case: schemathesis.Case) -> None:
    # With the operator's key and the webhook's secret, the generated input reaches past the auth checks.
    headers = {"Authorization": f"Bearer {OPERATOR_KEY}", "X-Webhook-Secret": WEBHOOK_SECRET}
    response = case.call(headers={**(case.headers or {}), **headers}, timeout=30)
    assert "Traceback" not in response.text and 'File "' not in response.text
    error_code = response.headers.get("x-error-code", [None])[0]  # Schemathesis' headers: lists, by lower-case name
    if response.status_code >= 400:
        body = response.json()
        assert set(body) >= {"error", "error_code"}, (case.operation.label, body)
        assert error_code == body["error_code"], (case.operation.label, response.status_code)
    if response.status_code >= 500:
        assert error_code in _cacheable_codes() - {"UnexpectedError"}, (case.operation.label, response.text)


def test_every_operation_with_generated_input(api_url: str) -> None:
    # (Schemathesis' own pytest plugin does not run on pytest 9: its operations are driven here.)
    schema = schemathesis.openapi.from_url(f"{api_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    for operation in operations:
        run = given(case=operation.as_strategy())(check)
        settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)(run)()
