"""What OpenAI's two APIs here share: the error envelope and its types, tool definitions and choice."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

from droidpool import errors
from droidpool.core.model import ToolSpec

TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,128}$")

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
    "quota": "insufficient_quota",
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


def tool_choice_of(value: Any, param: str) -> Literal["auto", "none"]:
    """``auto`` (the default) or ``none``; forcing calls (required, a named tool) is refused:
    droid lets the model choose, and ignoring the demand would be a wrong answer."""
    if value in (None, "auto") or (isinstance(value, Mapping) and value.get("type") == "auto"):
        return "auto"
    if value == "none" or (isinstance(value, Mapping) and value.get("type") == "none"):
        return "none"
    raise errors.InvalidRequest(f"'{param}' must be auto or none: droid cannot force a tool call.", param=param)


def tool_spec(raw: Any, where: str, schema_key: str) -> ToolSpec:
    if not isinstance(raw, Mapping) or not isinstance(raw.get("name"), str) or not TOOL_NAME.match(raw["name"]):
        raise errors.InvalidRequest(f"'{where}' needs a name of letters, digits, '_' or '-' (at most 128).",
                                    param=where)
    schema = raw.get(schema_key) or {"type": "object", "properties": {}}
    if not isinstance(schema, Mapping):
        raise errors.InvalidRequest(f"'{where}.{schema_key}' must be a JSON schema object.", param=where)
    description = raw.get("description") or ""
    return ToolSpec(raw["name"], description if isinstance(description, str) else "", dict(schema))
