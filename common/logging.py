"""Logging for every stepcache process: level from COMMON_LOG_LEVEL, plain or JSON lines.

Inside a job, every line carries the job id, the step and the dataset: :func:`job_context` sets them in
a context variable that a filter copies onto each record, so code deep inside a step logs with plain
`logging.getLogger(__name__)` and still says which job it belongs to. Inside an HTTP request of the API,
:func:`request_context` does the same with the request id, which the events published in the request carry
too. Passwords inside URLs are masked in every line, whoever logged them.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from common.config import LogFormat, LogLevel, mask_url

JOB_FIELDS = ("job_id", "step", "dataset")
CONTEXT_FIELDS = ("request_id", *JOB_FIELDS)
_job: ContextVar[dict[str, str]] = ContextVar("stepcache_job", default={})  # noqa: B039 (never mutated)
_request_id: ContextVar[str | None] = ContextVar("stepcache_request_id", default=None)
_URL_WITH_CREDENTIALS = re.compile(r"[a-z][a-z0-9+.-]*://[^\s/@'\"]*@[^\s'\"]+", re.IGNORECASE)
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s%(context)s: %(message)s"


def mask_secrets(text: str) -> str:
    """The text with the password of every URL in it masked."""
    return _URL_WITH_CREDENTIALS.sub(lambda match: mask_url(match.group(0)), text)


@contextmanager
def job_context(job_id: str, step: str, dataset: str) -> Iterator[None]:
    """Every line logged inside this block carries the job id, step and dataset."""
    token = _job.set({"job_id": job_id, "step": step, "dataset": dataset})
    try:
        yield
    finally:
        _job.reset(token)


@contextmanager
def request_context(request_id: str) -> Iterator[None]:
    """Every line logged, and every event made, inside this block carries the request id."""
    token = _request_id.set(request_id)
    try:
        yield
    finally:
        _request_id.reset(token)


def current_request_id() -> str | None:
    """The id of the API request this code runs for, if any."""
    return _request_id.get()


class JobContextFilter(logging.Filter):
    """Copies the current request's id and job's fields onto the record and masks secrets in its message."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = {**_job.get(), "request_id": _request_id.get()}
        for field in CONTEXT_FIELDS:
            setattr(record, field, context.get(field))
        record.context = "".join(f" [{field}={context[field]}]" for field in CONTEXT_FIELDS if context.get(field))
        message = record.getMessage()
        masked = mask_secrets(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the job's fields, and the exception."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in CONTEXT_FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                line[field] = value
        if record.exc_info:
            line["exception"] = mask_secrets(self.formatException(record.exc_info))
        return json.dumps(line, default=str)


def configure_logging(level: LogLevel = "INFO", log_format: LogFormat = "plain") -> None:
    """Set the root logger's level and its one handler; calling it again replaces that handler."""
    handler = logging.StreamHandler()
    handler.addFilter(JobContextFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(PLAIN_FORMAT))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "stepcache", False)]:
        root.removeHandler(old)
    handler.stepcache = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
