"""docker-compose.yml and the Dockerfile agree with the code (there is no Docker engine to run them here)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from common.config import AppConfig
from tasks.embedded import ROOT

SETTINGS = {
    prefix + name.upper()
    for settings in AppConfig.PREFIXES.values()
    for prefix in [str(settings.model_config.get("env_prefix", ""))]
    for name in settings.model_fields
}
SETTINGS |= {"PROMETHEUS_MULTIPROC_DIR"}


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def test_the_compose_file_parses_and_has_the_documented_services() -> None:
    services = compose()["services"]
    assert set(services) == {"redis", "mongo", "worker-light", "worker-heavy", "flower", "api", "prometheus"}
    assert services["redis"]["image"] == "redis:7" and services["mongo"]["image"] == "mongo:7"
    for name in ("redis", "mongo"):
        assert services[name]["healthcheck"]["test"] and services[name]["volumes"]


def test_workers_consume_the_queues_the_graph_routes_to() -> None:
    from common.processing_graph import get_processing_graph

    services = compose()["services"]
    queues = set()
    for name in ("worker-light", "worker-heavy"):
        command = services[name]["command"]
        assert command[:4] == ["celery", "-A", "tasks", "worker"]
        queues |= set(command[command.index("-Q") + 1].split(","))
    assert queues == {step.queue.value for step in get_processing_graph()}


def test_every_variable_the_services_set_is_one_the_code_reads() -> None:
    services = compose()["services"]
    for name in ("worker-light", "worker-heavy", "flower", "api"):
        environment = services[name]["environment"]
        assert set(environment) <= SETTINGS, set(environment) - SETTINGS
        assert {"QUEUE_REDIS_URL", "CACHE_MONGO_URL", "QUEUE_MONGO_URL"} <= set(environment)
        assert services[name]["volumes"] is not None


def test_the_api_serves_on_every_interface_with_a_healthcheck() -> None:
    api = compose()["services"]["api"]
    assert api["command"][:4] == ["python", "-m", "tasks", "api"] and "0.0.0.0" in api["command"]
    assert "/healthcheck" in " ".join(api["healthcheck"]["test"]) and "8000:8000" in api["ports"]
    assert api["environment"]["API_ASSETS_SIGNING_KEY"].startswith("${API_ASSETS_SIGNING_KEY:?")


def test_flower_needs_basic_auth_from_the_environment() -> None:
    command = " ".join(compose()["services"]["flower"]["command"])
    assert "celery -A tasks flower" in command and "--basic-auth=${FLOWER_BASIC_AUTH" in command


def test_the_dockerfile_installs_the_project_and_starts_a_worker() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11", dockerfile, re.MULTILINE)
    for copied in ("common", "tasks", "celeryconfig.py", "pyproject.toml", "constraints.txt"):
        assert copied in dockerfile and Path(ROOT / copied).exists()
    assert "pip install -c constraints.txt ." in dockerfile  # the versions CI tested
    assert 'CMD ["celery", "-A", "tasks", "worker"]' in dockerfile  # every queue


def test_prometheus_finds_the_fleet_through_the_apis_discovery_with_the_operators_key() -> None:
    from tasks.api import create_api

    loaded = compose()
    prometheus, api = loaded["services"]["prometheus"], loaded["services"]["api"]
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    assert prometheus["secrets"] == ["api_operator_key"]
    assert loaded["secrets"]["api_operator_key"] == {"environment": "API_OPERATOR_KEY"}
    assert api["environment"]["API_OPERATOR_KEY"].startswith("${API_OPERATOR_KEY:?")  # no key, no discovery
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    (sd,) = config["scrape_configs"][0]["http_sd_configs"]
    assert sd["authorization"] == {"type": "Bearer", "credentials_file": "/run/secrets/api_operator_key"}
    assert (
        sd["url"] == "http://api:8000/discovery/prometheus"
        and "/discovery/prometheus" in create_api().openapi()["paths"]
    )
    assert "8000:8000" in api["ports"]
    for name in ("worker-light", "worker-heavy"):  # scraped over the compose network
        assert loaded["services"][name]["environment"]["WORKER_METRICS_HOST"] == "0.0.0.0"
