"""What OpenAI's two APIs here share: the error envelope and its types."""

from __future__ import annotations

from typing import Any

from droidpool import errors

# Neutral error kinds → OpenAI's error ``type``.
TYPES: dict[errors.ErrorKind, str] = {
    "invalid_request": "invalid_request_error",
    "authentication": "authentication_error",
    "permission": "permission_error",
    "not_found": "invalid_request_error",
    "method_not_allowed": "invalid_request_error",
    "request_timeout": "invalid_request_error",
    "conflict": "invalid_request_error",
    "misdirected": "invalid_request_error",
    "too_large": "invalid_request_error",
    "unsupported_media_type": "invalid_request_error",
    "rate_limit": "rate_limit_error",
    "upstream": "upstream_error",
    "unavailable": "server_error",
    "timeout": "timeout_error",
    "internal": "server_error",
}


def error_object(error: errors.DroidpoolError, params: dict[str, str] | None = None) -> dict[str, Any]:
    """``{"message", "type", "param", "code"}``; ``params`` renames neutral param names."""
    param = error.param
    if params and param in params:
        param = params[param]
    return {"message": error.message, "type": TYPES[error.kind], "param": param, "code": error.error_code}


def error_body(error: errors.DroidpoolError) -> tuple[int, dict[str, Any]]:
    return error.status, {"error": error_object(error)}
