"""The error hierarchy: every failure a client can see, with its HTTP status and OpenAI fields."""

from __future__ import annotations

from typing import Any, ClassVar


class DroidpoolError(Exception):
    """Base of every client-visible error; formatted in one place as the OpenAI envelope."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
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

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.instance_code or self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after)))}


class InvalidRequest(DroidpoolError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(DroidpoolError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(DroidpoolError):
    """Authenticated, but this key may not do that."""

    status = 403
    type = "permission_error"
    code = "forbidden"


class NotFound(DroidpoolError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class SessionNotFound(NotFound):
    code = "session_not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class Conflict(DroidpoolError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class ConversationConflict(Conflict):
    """A conversation id already names another live session."""

    code = "conversation_conflict"


class MethodNotAllowed(DroidpoolError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTimeout(DroidpoolError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class PayloadTooLarge(DroidpoolError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedMediaType(DroidpoolError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class Overloaded(DroidpoolError):
    """The wait queue is full or the wait for a worker ran out."""

    status = 429
    type = "rate_limit_error"
    code = "pool_exhausted"


class UpstreamError(DroidpoolError):
    """droid reported a failed turn (model auth, provider down, ...)."""

    status = 502
    type = "upstream_error"
    code = "droid_turn_failed"


class WorkerCrashed(UpstreamError):
    code = "worker_crashed"


class Unavailable(DroidpoolError):
    status = 503
    type = "server_error"
    code = "unavailable"


class DeadlineExceeded(DroidpoolError):
    status = 504
    type = "timeout_error"
    code = "deadline_exceeded"


class InternalError(DroidpoolError):
    status = 500
    type = "server_error"
    code = "internal_error"
