"""What an error of `huggingface_hub`, `datasets` or the network means for a step's response.

:func:`typed_hub_error` turns it into the cacheable error a reader of the cache understands:

- a timeout, a dropped connection, a 429 or a 5xx answer: :class:`HubTransientError` (retried with
  backoff and counted by the Hub's shared circuit breaker, see common.resilience);
- a gated dataset without a token that has access: :class:`DatasetGatedError` (403);
- a missing or private dataset, or a revision that is gone: :class:`DatasetNotFoundError` (404);
- no data files: :class:`EmptyDatasetError`; a file that cannot be read: :class:`DatasetGenerationError`.

Messages are the libraries' own, which name URLs but never the token (a test checks it), with local paths
and the host name taken out (common.redaction): a cached error's message is served to anyone.
"""

from __future__ import annotations

from common.exceptions import (
    CacheableError,
    DatasetGatedError,
    DatasetGenerationError,
    DatasetNotFoundError,
    EmptyDatasetError,
    HubTransientError,
)
from common.redaction import redact

TRANSIENT_STATUSES = frozenset({408, 429})


def typed_hub_error(error: BaseException) -> CacheableError | None:
    """The cacheable error that `error` means, or None when it means nothing known (a bug: UnexpectedError)."""
    import datasets.builder
    import datasets.data_files
    import datasets.exceptions
    import datasets.table
    import httpx2
    import pandas.errors
    import pyarrow as pa
    import yaml  # (PyYAML: what `datasets` reads READMEs with)
    from huggingface_hub import errors

    message = redact(f"{type(error).__name__}: {error}")
    if isinstance(error, errors.GatedRepoError):
        return DatasetGatedError(f"the dataset is gated and the token has no access to it ({message})", error)
    if isinstance(error, errors.RepositoryNotFoundError | errors.RevisionNotFoundError | errors.DisabledRepoError):
        return DatasetNotFoundError(f"the dataset does not exist or cannot be accessed ({message})", error)
    if isinstance(error, errors.HfHubHTTPError):
        status = error.response.status_code if error.response is not None else None
        if status is None or status >= 500 or status in TRANSIENT_STATUSES:
            return HubTransientError(f"the Hub answered {status} ({message})", error)
        if status in (401, 403, 404):
            return DatasetNotFoundError(f"the dataset cannot be accessed: {status} ({message})", error)
        return None
    if isinstance(error, httpx2.TimeoutException | httpx2.NetworkError | httpx2.RemoteProtocolError):
        return HubTransientError(f"the Hub did not answer ({message})", error)
    if isinstance(error, TimeoutError | ConnectionError):
        return HubTransientError(f"the Hub did not answer ({message})", error)
    if isinstance(error, datasets.exceptions.DatasetNotFoundError):
        if "gated" in str(error).lower():
            return DatasetGatedError(f"the dataset is gated and the token has no access to it ({message})", error)
        return DatasetNotFoundError(f"the dataset does not exist or cannot be accessed ({message})", error)
    if isinstance(error, yaml.YAMLError | datasets.builder.InvalidConfigName):
        return DatasetGenerationError(f"the dataset's README declares configs that cannot be read ({message})", error)
    if isinstance(error, datasets.data_files.EmptyDatasetError | datasets.exceptions.DataFilesNotFoundError):
        return EmptyDatasetError(f"the dataset has no data files in a supported format ({message})", error)
    unreadable = (
        datasets.exceptions.DatasetsError,
        datasets.table.CastError,
        pandas.errors.ParserError,
        pandas.errors.EmptyDataError,
    )
    if isinstance(error, (*unreadable, pa.ArrowException, UnicodeError, OSError)):
        return DatasetGenerationError(f"the dataset's files cannot be read ({message})", error)
    return None
