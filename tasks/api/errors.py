"""The errors the API answers with, beside the typed errors of common.exceptions.

Every error body is `{"error": message, "error_code": code}`; the code is also in the `X-Error-Code`
header, and no error is kept by a cache (`Cache-Control: no-store`). A cached error keeps the status and
code its step stored. The codes the dataset viewer's clients know are the viewer's own:
`MissingRequiredParameter` and `InvalidParameter` (422), `ExternalUnauthenticatedError` (401: no dataset
by that name, or not without a JWT for it), `ExternalAuthenticatedError` (404: a JWT that does not give
access to it), `ResponseNotReady` (500, with Retry-After) and `ResponseNotFound` (404).
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi.responses import JSONResponse

from common.exceptions import CacheableError, InvalidInputError, StepcacheError, UnknownJobError
from common.redaction import redact

ERROR_CODE_HEADER = "X-Error-Code"


class ApiError(StepcacheError):
    """An answer other than the cached content; `error_code` is the class name unless set."""

    http_status = HTTPStatus.INTERNAL_SERVER_ERROR
    error_code: str | None = None
    headers: dict[str, str] = {}  # noqa: RUF012 (instances replace it, never mutate it)

    def __init__(
        self, message: str, headers: dict[str, str] | None = None, error_code: str | None = None, **fields: Any
    ) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields
        if headers is not None:
            self.headers = headers
        if error_code is not None:
            self.error_code = error_code

    @property
    def code(self) -> str:
        return self.error_code or type(self).__name__


class AuthenticationRequiredError(ApiError):
    """No credentials, or credentials that are not valid (expired, tampered, wrong audience)."""

    http_status = HTTPStatus.UNAUTHORIZED


class ForbiddenError(ApiError):
    """Valid credentials that do not give access to this resource."""

    http_status = HTTPStatus.FORBIDDEN


class NotFoundError(ApiError):
    http_status = HTTPStatus.NOT_FOUND


class ExternalUnauthenticatedError(ApiError):
    """No dataset by that name, or not one readable without a JWT for it (gated or private), and the request
    sent no valid JWT: one answer for both, so that asking tells nothing about what exists."""

    http_status = HTTPStatus.UNAUTHORIZED


class ExternalAuthenticatedError(ApiError):
    """The request sent a valid JWT, but not one for this dataset (or there is no such dataset)."""

    http_status = HTTPStatus.NOT_FOUND


# The viewer's message for both, whatever the reason (ours says it after it).
NO_ACCESS = (
    "The dataset does not exist, or is not accessible without authentication (private or gated). Please check "
    "the spelling of the dataset name or retry with authentication."
)


class ResponseNotReadyError(ApiError):
    """The entry is being computed (or a backfill for it was just enqueued): ask again after Retry-After. A
    500, as the viewer answers (its clients retry on it); the code is the viewer's, `ResponseNotReady`."""

    http_status = HTTPStatus.INTERNAL_SERVER_ERROR
    error_code = "ResponseNotReady"


class ResponseNotFoundError(ApiError):
    """No entry, none being computed, and the graph does not expect one (say, a config the dataset lacks)."""

    http_status = HTTPStatus.NOT_FOUND
    error_code = "ResponseNotFound"


class PayloadTooLargeError(ApiError):
    http_status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class RequestTimeoutError(ApiError):
    http_status = HTTPStatus.GATEWAY_TIMEOUT


class ServiceUnavailableError(ApiError):
    http_status = HTTPStatus.SERVICE_UNAVAILABLE


class TooManyStreamsError(ApiError):
    http_status = HTTPStatus.TOO_MANY_REQUESTS


class InvalidParameterError(ApiError):
    http_status = HTTPStatus.UNPROCESSABLE_ENTITY
    error_code = "InvalidParameter"


class MissingRequiredParameterError(ApiError):
    http_status = HTTPStatus.UNPROCESSABLE_ENTITY
    error_code = "MissingRequiredParameter"


def error_body(message: str | None, code: str | None, **fields: Any) -> dict[str, Any]:
    return {"error": message, "error_code": code, **fields}


def error_response(
    status: int, message: str, code: str, headers: dict[str, str] | None = None, **fields: Any
) -> JSONResponse:
    headers = {"Cache-Control": "no-store", **(headers or {}), ERROR_CODE_HEADER: code}
    return JSONResponse(error_body(message, code, **fields), status, headers=headers)


def answer_error(error: Exception) -> JSONResponse:
    """The JSON answer of an error raised while serving a request (never a traceback, nor a local path or
    the host name from a typed error's message)."""
    if isinstance(error, ApiError):
        return error_response(error.http_status, error.message, error.code, error.headers, **error.fields)
    if isinstance(error, UnknownJobError):
        return error_response(HTTPStatus.NOT_FOUND, str(error), type(error).__name__)
    if isinstance(error, InvalidInputError):
        return error_response(HTTPStatus.UNPROCESSABLE_ENTITY, str(error), type(error).__name__)
    if isinstance(error, CacheableError):
        return error_response(error.http_status, redact(error.message), error.error_code)
    return error_response(HTTPStatus.INTERNAL_SERVER_ERROR, "an unexpected error occurred", "UnexpectedError")
