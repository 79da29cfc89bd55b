"""`python -m tasks api`: the HTTP API (tasks.api.create_api) on uvicorn, its metrics on API_METRICS_PORT.

Logging is stepcache's (COMMON_LOG_LEVEL, COMMON_LOG_FORMAT; uvicorn's own access log is off: the API
writes one line per request with its request id). The metrics of every uvicorn worker process are
gathered through PROMETHEUS_MULTIPROC_DIR; each of them registers itself (tasks.api.discovery) with the URL
of the metrics served here.
"""

from __future__ import annotations

import logging
import os
import sys

from common.config import get_config_or_exit
from common.logging import configure_logging
from common.metrics import prepare_multiprocess, serve
from common.registry import metrics_url
from tasks.api.discovery import METRICS_URL_ENV

logger = logging.getLogger(__name__)


def serve_api(host: str | None = None, port: int | None = None, workers: int | None = None) -> int:
    settings = get_config_or_exit()
    host, workers = host or settings.api.host, workers or settings.api.workers
    if workers > 1 and not settings.api.assets_signing_key.get_secret_value():
        print("stepcache: --workers > 1 needs API_ASSETS_SIGNING_KEY: every process must sign alike", file=sys.stderr)
        return 2
    configure_logging(settings.common.log_level, settings.common.log_format)
    prepare_multiprocess()  # before prometheus_client is imported
    if settings.api.metrics_port:
        try:
            serve(settings.api.metrics_port, host)
            # Its processes (uvicorn's, started from here) register with the URL of the metrics served here.
            os.environ[METRICS_URL_ENV] = metrics_url(host, settings.api.metrics_port) or ""
        except OSError as error:  # the API serves without its metrics rather than not at all
            logger.warning("no metrics: port %s: %s", settings.api.metrics_port, error)
    import uvicorn

    from tasks.api.protocol import uvicorn_options

    uvicorn.run(
        "tasks.api.app:create_api",
        factory=True,
        host=host,
        port=settings.api.port if port is None else port,
        workers=workers,
        **uvicorn_options(settings.api),
    )
    return 0
