"""Every failure a client can see, dialect-neutral: status, kind, code, param and retry-after.

Each wire dialect turns these into its own envelope in one place (``api/<dialect>.py``).
"""

from __future__ import annotations

from typing import ClassVar, Literal

ErrorKind = Literal[
    "invalid_request",
    "authentication",
    "permission",
    "not_found",
    "method_not_allowed",
    "request_timeout",
    "conflict",
    "misdirected",
    "too_large",
    "unsupported_media_type",
    "rate_limit",
    "quota",
    "upstream",
    "unavailable",
    "timeout",
    "internal",
]


class DroidpoolError(Exception):
    """Base of every client-visible error."""

    status: ClassVar[int] = 500
    kind: ClassVar[ErrorKind] = "internal"
    code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.instance_code = code
        self.retry_after = retry_after
        self.context_headers: dict[str, str] = {}  # e.g. the session a failed turn ran on

    @property
    def error_code(self) -> str | None:
        return self.instance_code or self.code

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return dict(self.context_headers)
        return {**self.context_headers, "Retry-After": str(max(1, round(self.retry_after)))}


class InvalidRequest(DroidpoolError):
    status = 400
    kind = "invalid_request"


class Unauthorized(DroidpoolError):
    status = 401
    kind = "authentication"
    code = "invalid_api_key"


class Forbidden(DroidpoolError):
    """Authenticated, but this key may not do that."""

    status = 403
    kind = "permission"
    code = "forbidden"


class NotFound(DroidpoolError):
    status = 404
    kind = "not_found"
    code = "not_found"


class SessionNotFound(NotFound):
    code = "session_not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class ResponseNotFound(NotFound):
    code = "response_not_found"


class MethodNotAllowed(DroidpoolError):
    status = 405
    kind = "method_not_allowed"
    code = "method_not_allowed"


class RequestTimeout(DroidpoolError):
    status = 408
    kind = "request_timeout"
    code = "request_timeout"


class Misdirected(DroidpoolError):
    """The request names a host this server does not answer to (a DNS-rebinding guard)."""

    status = 421
    kind = "misdirected"
    code = "host_not_allowed"


class Conflict(DroidpoolError):
    status = 409
    kind = "conflict"
    code = "conflict"


class ConversationConflict(Conflict):
    """A conversation id already names another live session."""

    code = "conversation_conflict"


class PayloadTooLarge(DroidpoolError):
    status = 413
    kind = "too_large"
    code = "request_too_large"


class UnsupportedMediaType(DroidpoolError):
    status = 415
    kind = "unsupported_media_type"
    code = "unsupported_media_type"


class Overloaded(DroidpoolError):
    """The wait queue is full or the wait for a worker ran out."""

    status = 429
    kind = "rate_limit"
    code = "pool_exhausted"


class QuotaExceeded(DroidpoolError):
    """A budget of the key (or of the whole service) is used up; Retry-After says when it frees."""

    status = 429
    kind = "quota"
    code = "insufficient_quota"


class UpstreamError(DroidpoolError):
    """droid reported a failed turn (model auth, provider down, ...)."""

    status = 502
    kind = "upstream"
    code = "droid_turn_failed"


class StructuredOutputFailed(UpstreamError):
    """The model did not give an answer matching the requested schema (droid corrected it twice)."""

    code = "structured_output_invalid"


class UpstreamRateLimited(DroidpoolError):
    """The model provider rate-limited droid (not droidpool's own pool or budgets)."""

    status = 429
    kind = "rate_limit"
    code = "upstream_rate_limited"


class WorkerCrashed(UpstreamError):
    code = "worker_crashed"


class Unavailable(DroidpoolError):
    status = 503
    kind = "unavailable"
    code = "unavailable"


class DeadlineExceeded(DroidpoolError):
    status = 504
    kind = "timeout"
    code = "deadline_exceeded"


class InternalError(DroidpoolError):
    status = 500
    kind = "internal"
    code = "internal_error"
