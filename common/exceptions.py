"""Every error stepcache raises, in one tree.

::

    StepcacheError
     ├── ConfigError                        a bad environment variable (one line, process stops)
     ├── InvalidInputError                  refused before anything touches Redis, Mongo or disk
     │    ├── InvalidDatasetNameError
     │    ├── InvalidConfigNameError
     │    ├── InvalidSplitNameError
     │    ├── UnknownStepError
     │    ├── UnknownJobError
     │    ├── MissingStepInputError          a config-level step called without a config, ...
     │    └── InvalidArgumentsError          arguments that cannot cross the broker as JSON
     ├── ProcessingGraphError               a graph that cannot be loaded
     │    ├── ProcessingGraphCycleError
     │    ├── UnknownParentStepError
     │    └── InvalidStepSpecError
     ├── CachedResponseNotFoundError        no cache entry for (kind, dataset, config, split)
     ├── JobLeaseLostError                  a running job lost its lease: it stops and writes nothing
     ├── ServerUnreachableError             Redis, MongoDB or the broker did not answer in time (CLI: exit 3)
     └── CacheableError                     lands in the cache: error_code, http_status, cause
          ├── ContentTooBigError                 501  content over WORKER_CONTENT_MAX_BYTES
          ├── ContentNotStorableError            500  content that is not a JSON/BSON document
          ├── JobManagerCrashedError             500  the worker died or stopped heart-beating
          ├── JobManagerExceededMaximumDurationError 500  the job hit its time limit
          ├── StepNotImplementedError            501  the step has no function yet
          ├── StepNotKnownError                  501  no live worker knows the step (none imports its module)
          ├── HubUnavailableError                503  the Hub's circuit breaker is open
          ├── HubTransientError                  502  the Hub timed out, dropped the connection or answered 5xx
          ├── DatasetNotFoundError               404  no such dataset (or no access to it)
          ├── DatasetGatedError                  403  a gated dataset, and no token with access to it
          ├── ConfigNotFoundError                404  no such config in the dataset
          ├── SplitNotFoundError                 404  no such split in the config
          ├── EmptyDatasetError                  500  the dataset has no data files
          ├── DatasetGenerationError             500  a data file cannot be read (corrupted, wrong format)
          ├── DataFilesOutsideDatasetError       403  a config names data files that are not the dataset's own
          ├── TooManyColumnsError                501  more columns than WORKER_FIRST_ROWS_MAX_COLUMNS
          ├── PreviousStepMissingError           500  a parent step's response is not in the cache
          └── ParentStepFailedError              (the parent's status)  a parent step's response is an error
          └── UnexpectedError                    500  a step raised something untyped (the cause says what)

A :class:`CacheableError` is stored as the response of the step that raised it: its ``error_code``
(the class name, stable across releases), ``http_status`` and ``details`` (the message and the cause)
are what a reader of the cache sees.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any


class StepcacheError(Exception):
    """Root of every error stepcache raises on purpose."""


class ConfigError(StepcacheError):
    """An environment variable has a value stepcache cannot accept."""


class InvalidInputError(StepcacheError, ValueError):
    """Input refused before anything is written anywhere."""


class InvalidDatasetNameError(InvalidInputError):
    """Not `org/name` or a canonical `name` made of [A-Za-z0-9._-]."""


class InvalidConfigNameError(InvalidInputError):
    """A config name that is empty, too long, or holds a path separator or a control character."""


class InvalidSplitNameError(InvalidInputError):
    """A split name that is empty, too long, or holds a path separator or a control character."""


class UnknownStepError(InvalidInputError):
    """No processing step of that name is in the graph."""


class UnknownJobError(InvalidInputError):
    """No job of that id is in the ledger."""


class MissingStepInputError(InvalidInputError):
    """A step was called without the config or split its input type needs, or with one it cannot use."""


class InvalidArgumentsError(InvalidInputError):
    """Arguments that are not JSON, or that the step does not take."""


class ProcessingGraphError(StepcacheError):
    """The processing graph cannot be loaded as declared."""


class ProcessingGraphCycleError(ProcessingGraphError):
    """The steps' parents form a cycle."""


class UnknownParentStepError(ProcessingGraphError):
    """A step names a parent that is not in the graph."""


class InvalidStepSpecError(ProcessingGraphError):
    """A step spec is malformed: bad name, input type, queue, version, or a root that is not dataset-level."""


class CachedResponseNotFoundError(StepcacheError, LookupError):
    """The cache holds no entry for this (kind, dataset, config, split)."""


class JobLeaseLostError(StepcacheError):
    """The job's lease was taken back while it ran (missed heartbeats): another attempt may run now."""


class ServerUnreachableError(StepcacheError):
    """A server a command needs (Redis, MongoDB, the broker) refused it or did not answer in time."""


class CacheableError(StepcacheError):
    """An error that is stored in the cache as the response of a step.

    Subclasses set ``http_status``; ``error_code`` is the class name unless a subclass says otherwise.
    """

    http_status: HTTPStatus = HTTPStatus.INTERNAL_SERVER_ERROR
    error_code: str = ""

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.cause = cause
        if cause is not None:
            self.__cause__ = cause

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "error_code" not in cls.__dict__:
            cls.error_code = cls.__name__

    def as_details(self) -> dict[str, Any]:
        """What the cache stores in `details`: the message and, when there is one, the cause."""
        details: dict[str, Any] = {"error": self.message}
        if self.cause is not None:
            details["cause_exception"] = type(self.cause).__name__
            details["cause_message"] = str(self.cause)
        return details


CacheableError.error_code = "CacheableError"


class ContentTooBigError(CacheableError):
    """The content is larger than WORKER_CONTENT_MAX_BYTES once encoded."""

    http_status = HTTPStatus.NOT_IMPLEMENTED


class ContentNotStorableError(CacheableError):
    """The content cannot be stored as a document (not a mapping of JSON-like values)."""


class JobManagerCrashedError(CacheableError):
    """The job's worker died, or stopped sending heartbeats, before the job finished."""


class JobManagerExceededMaximumDurationError(CacheableError):
    """The job ran longer than WORKER_MAX_JOB_DURATION_SECONDS."""


class StepNotImplementedError(CacheableError):
    """The step is declared in the graph but no function computes it."""

    http_status = HTTPStatus.NOT_IMPLEMENTED


class StepNotKnownError(CacheableError):
    """The job's message reached a worker that does not know its step, and no live worker in the registry
    knows it (none imports the module that defines it)."""

    http_status = HTTPStatus.NOT_IMPLEMENTED


class UnexpectedError(CacheableError):
    """A step raised an error that is not one of stepcache's; its type and message are the cause."""


class HubUnavailableError(CacheableError):
    """The Hub failed too often lately: calls fail fast until the circuit breaker half-opens."""

    http_status = HTTPStatus.SERVICE_UNAVAILABLE


class HubTransientError(CacheableError):
    """The Hub timed out, dropped the connection, or answered 429 or 5xx: worth trying again."""

    http_status = HTTPStatus.BAD_GATEWAY


class DatasetNotFoundError(CacheableError):
    """The dataset does not exist, or the token gives no access to it."""

    http_status = HTTPStatus.NOT_FOUND


class DatasetGatedError(CacheableError):
    """The dataset is gated on the Hub, and COMMON_HF_TOKEN is missing or has no access to it."""

    http_status = HTTPStatus.FORBIDDEN


class ConfigNotFoundError(CacheableError):
    """The dataset has no config of that name."""

    http_status = HTTPStatus.NOT_FOUND


class SplitNotFoundError(CacheableError):
    """The config has no split of that name."""

    http_status = HTTPStatus.NOT_FOUND


class EmptyDatasetError(CacheableError):
    """The dataset has no data file stepcache can read."""


class DatasetGenerationError(CacheableError):
    """A data file cannot be read: corrupted, or not in the format its name says."""


class DataFilesOutsideDatasetError(CacheableError):
    """A config names data files outside the dataset's own files (`..` or an absolute path in its README's
    `data_files` or `data_dir`): refused, never read."""

    http_status = HTTPStatus.FORBIDDEN


class TooManyColumnsError(CacheableError):
    """The dataset has more columns than the viewer shows."""

    http_status = HTTPStatus.NOT_IMPLEMENTED


class PreviousStepMissingError(CacheableError):
    """A step ran before the response of its parent step was in the cache."""


class ParentStepFailedError(CacheableError):
    """A parent step's response is an error, so this step is not computed; the cause says which."""
