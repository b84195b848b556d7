"""What OpenAI's two APIs here share: the error envelope and its types, tool definitions and choice."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

from droidpool import errors
from droidpool.core import attachments, structured
from droidpool.core.model import Attachment, OutputFormat, ToolSpec

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


# --- attachments and structured output (Chat Completions and Responses read them alike) ----------

# File name endings → media type, for file parts that carry bare base64 and a name.
SUFFIX_TYPES = {".pdf": "application/pdf", ".txt": "text/plain", ".md": "text/markdown", ".csv": "text/csv",
                ".json": "application/json", ".html": "text/html", ".xml": "application/xml"}


def file_attachment(data: Any, url: Any, file_id: Any, filename: Any, where: str) -> Attachment:
    """A document from a file part: ``file_data`` (a data: URL or bare base64), a URL, or a file id
    (refused: droidpool has no Files API)."""
    name = filename if isinstance(filename, str) else ""
    if data is None and url is None:
        why = "file ids are not supported (droidpool has no Files API); send file_data" if file_id is not None \
            else "a file part needs file_data"
        return attachments.unsupported("document", where, why)
    if data is None:
        return attachments.from_url("document", url, name=name, where=where)
    if isinstance(data, str) and data.startswith("data:"):
        return attachments.from_url("document", data, name=name, where=where)
    suffix = name[name.rfind("."):].lower() if "." in name else ""
    return attachments.from_base64("document", SUFFIX_TYPES.get(suffix, ""), data, name=name, where=where)


def image_attachment(url: Any, file_id: Any, where: str) -> Attachment:
    """An image from an image URL (a data: URL, or http(s) when fetching is allowed) or a file id."""
    if url is None and file_id is not None:
        return attachments.unsupported("image", where, "file ids are not supported (droidpool has no Files API); "
                                                       "send the image as a data: URL")
    return attachments.from_url("image", url, where=where)


def json_format(kind: Any, spec: Mapping[str, Any], where: str) -> OutputFormat | None:
    """``text`` (None), ``json_object`` (any JSON object) or ``json_schema`` (``spec`` holds name,
    schema, strict) as droid's structured output; other types are a 400."""
    if kind == "text":
        return None
    if kind == "json_object":
        return OutputFormat(structured.ANY_OBJECT, "", False, where)
    if kind != "json_schema":
        raise errors.InvalidRequest(f"'{where}.type' must be text, json_object or json_schema.", param=where)
    name = spec.get("name")
    if name is not None and not isinstance(name, str):
        raise errors.InvalidRequest(f"'{where}.name' must be a string.", param=where)
    if "schema" not in spec:
        raise errors.InvalidRequest(f"'{where}.schema' is required.", param=where)
    return structured.output_format(spec["schema"], f"{where}.schema", name=name or "", strict=bool(spec.get("strict")))
