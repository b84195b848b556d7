#!/usr/bin/env python3
"""A fake ``droid`` CLI (Factory droid 0.225.2) for unit tests: stdlib only, fast startup.

Usage::

    fake_droid.py --version                      -> prints 0.225.2, exit 0
    fake_droid.py exec --input-format stream-jsonrpc --output-format stream-jsonrpc [ignored flags]

The second form is a JSON-RPC server on stdin/stdout, one JSON object per line, with the
same envelopes and notification shapes as the real CLI (copied from recorded transcripts):

    {"jsonrpc":"2.0","type":"notification","factoryApiVersion":"1.0.0","factoryProtocolVersion":"1.220.0",
     "method":"droid.session_notification","params":{"sessionId":"…","notification":{"type":"…",…}}}

Methods: droid.initialize_session, droid.load_session, droid.add_user_message,
droid.interrupt_session, droid.update_session_settings, droid.list_models, droid.list_tools,
droid.get_context_stats, droid.close_session; anything else -> -32601.

The "model" answers with deterministic, non-repeating words derived from the user text,
streamed as 4 deltas a few ms apart; the answer ends with ``[system=<first 20 chars of the
system prompt or none>] [turns=K]`` where K is the number of user messages in the session
including the current one (proves history continuity, also across processes).

Turn directives (anywhere in the user text; they can be combined):
    [[slow:MS]]        6 deltas, MS ms apart
    [[reasoning]]      3 thinking_text_delta + thinking_text_complete before the text
    [[error:401]]      error notification + system "BYOK Error" message, reason model_authentication_failed
    [[error:429]]      2 llm_retry rate_limited (+ retraction), then fails: reason model_rate_limited
    [[error:500]]      2x (partial delta, llm_retry overloaded, assistant_message_retracted), then success
    [[error:model]]    "Custom model configuration is unavailable", reason error (as for an unknown model)
    [[crash]]          2 deltas, a line on stderr, exit code 1
    [[crash:before]]   a line on stderr, exit code 1 before any delta
    [[hang]]           nothing more until interrupted (interrupt_session, stdin EOF or SIGTERM)
    [[hang_mid]]       one delta, then hang until interrupted
    [[garbage]]        a non-JSON line and a JSON line of unknown shape mid-turn, then continue
    [[huge]]           one 5 MiB stdout line (valid notification of unknown type), then continue
    [[permission]]     server->client droid.request_permission (real shape); the answer text
                       contains [permission=<selectedOption>]
    [[permission:strict]]  same, but "cancel" ends the turn like the real CLI (no second message)
    [[usage:IN,OUT]]   tokenUsage inputTokens/outputTokens of the turn (a failed or interrupted
                       turn reports it too)
    [[usage:IN,OUT,CACHE_READ,CACHE_CREATION,CREDITS]]  ... and cacheReadTokens,
                       cacheCreationTokens, factoryCredits (a number)
    [[call:NAME:{json}]]  the LLM calls MCP tool NAME of the session's mcpServers (several: one
                       permission request for all, as droid 0.225.2 does): tool_call notifications,
                       droid.request_permission (confirmationType mcp_tool); on proceed_once the
                       tools are called over MCP (initialize, tools/list, tools/call, with the
                       server's headers) and the answer is "Tool said: " + the results joined by
                       " | "; on cancel the turn ends; an interrupt while asking resolves the
                       request as cancelled (recorded: rpc_client_tools_*.stdout.jsonl). A tool
                       result with image content: tool_result.content is a list of blocks
                       ({"type":"image","source":{"type":"base64","mediaType","data"}}, text);
                       the result in the answer is its text + " [+N image(s)]" for a model that
                       takes images, else "[Image not shown: …]\n" + text, as the recorded LLM
                       saw it (rpc_attach_tool_image*.stdout.jsonl)
    [[fail:REASON]]    error notification, system user_only "BYOK Error: Simulated failure
                       (REASON)" message, agent_turn_completed reason REASON (any string:
                       model_usage_exhausted, prompt_rejected, structured_output_missing, ...);
                       [[fail:REASON:MESSAGE]] uses MESSAGE as the error text
    [[json:TEXT]]      (with outputFormat) every attempt answers TEXT (greedy up to the last "]]")
    [[attempts:A||B||C]]  (with outputFormat) attempt n answers the n-th text (the last repeats)
    [[image_error]]    (with images) the image cannot be used: fails like an image droid cannot
                       shrink below its limit ("Unable to compress image below provider size
                       limit"); [[image_error:MESSAGE]] uses MESSAGE

droid.add_user_message also takes images, files and outputFormat, checked and answered as
droid 0.225.2 does (recorded: tests/fixtures/rpc_attach_*, rpc_structured_*):
    images   [{"type":"base64","mediaType":"image/png|jpeg|gif|webp","data":…}]; other shapes or
             media types: -32602 with droid's zod text. Before the turn each image is checked
             (PNG: signature and complete chunks up to IEND; JPEG: SOI; GIF/WEBP: refused, as
             droid only re-encodes PNG/JPEG). A bad one: the request's {} response, then
             agent_turn_completed reason error (a turn id of its own, no message, no idle), an
             error notification and a second response to the same request id, -32603 with the
             message ("There are some read requests waitng on finished stream", "unrecognised
             content at end of stream", "SOI not found", "Unsupported image type for
             compression. Only PNG and JPEG images are supported."). A good one is written to
             $HOME/.factory/temp/images/<8 hex, one folder per process>/<uuid>.<png|jpeg>
             (removed when the process exits normally), and the user message's content is
             [image blocks, document blocks, text]. The answer gets " [images=N]" for a model
             that takes images (FAKE_DROID_VISION_MODELS) or " [images=N not shown]". When the
             session's images reach 10 (droid's media limit; above it the oldest 5 are dropped)
             an llm_only "__internal__system-reminder__<uuid>" create_message follows the user
             message. The fake does not re-encode images (droid scales them to 1024 px and
             shrinks them under 200 KiB, as JPEG if needed).
    files    [{"type":"text","mediaType":"text/plain","data","name"?,"mime"?}] or
             [{"type":"base64","mediaType":"application/pdf","data","name"?,"parsedData"?}];
             anything else: -32602 "params.files.N: Invalid input". A PDF is written to
             $HOME/.factory/sessions/<session id>/attachments/<ms>-<name> (kept) and its block
             gets "path". The answer gets " [files=<names, unknown when none>]".
    outputFormat {"type":"json_schema","schema":{…}}: a schema that is not valid (unknown type,
             malformed keywords) ends the turn before any message: reason
             structured_output_schema_invalid. Otherwise the answer is JSON (see [[json]],
             [[attempts]]; default: a value built from the schema), checked against the schema
             (types, required, properties, additionalProperties:false, enum, const, items; the
             top level must be an object) with droid's error texts; up to 3 attempts, each with
             its own messageId; rejected ones are streamed but never retracted nor get a
             create_message; the accepted one gets create_message (JSON re-serialized) and a
             structured_output notification; after 3: error (StructuredOutputError), the BYOK
             system message and reason structured_output_invalid.

Environment:
    FAKE_DROID_STATE          session store directory (default $HOME/.fake-droid)
    FAKE_DROID_START_DELAY_MS delay before the first line (mcp_status_changed)
    FAKE_DROID_FAIL_START=1   error on stderr, exit 1 at startup
    FAKE_DROID_IGNORE_SIGTERM=1  ignore SIGTERM (otherwise: exit 0 promptly; a running turn is
                              fast-forwarded and ends with reason process_exit)
    FAKE_DROID_SPAWN_CHILD=1  start `sleep 300` in the same process group (stdio on /dev/null;
                              =inherit keeps our stdout/stderr); pid written to
                              FAKE_DROID_CHILD_PIDFILE if that is set
    FAKE_DROID_LOG            append one line per received request method to this file
    FAKE_DROID_MODELS         extra model ids (comma-separated) for list_models/availableModels;
                              an id without "custom:" is a Factory model (isCustom false)
    FAKE_DROID_VISION_MODELS  model ids (comma-separated) that take images (noImageSupport false);
                              unset: every id containing "vision" (custom:fake-vision, ...)
    FAKE_DROID_MULTIPLIERS    tokenMultiplier of Factory models: "claude-opus-5=2,other=0.4"
                              (a Factory model not named here has none, like droid's BYOK entry)
    FAKE_DROID_MINT           ""  (default) load_session also loads a session written in droid's own
                              layout under $HOME/.factory/sessions (see Server.load_minted); "ignore":
                              not found; "stale": loaded, but the old conversation stays in memory
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import queue
import re
import signal
import sys
import threading
import time
import uuid

VERSION = "0.225.2"
API_VERSION = "1.0.0"
PROTOCOL_VERSION = "1.220.0"
NOTIFY_METHOD = "droid.session_notification"

DEFAULT_DELAY_S = 0.004
DEFAULT_DELTAS = 4
SLOW_DELTAS = 6
HUGE_LINE_BYTES = 5 * 1024 * 1024

AUTONOMY_LEVELS = ["off", "low", "medium", "high"]
AUTONOMY_MODE = {"off": "normal", "low": "auto-low", "medium": "auto-medium", "high": "auto-high"}
BASE_MODELS = ["custom:fake-model", "custom:fake-echo"]

WORDS = (
    "amber basalt cobalt dune ember fjord granite harbor indigo juniper kelp lagoon meadow "
    "nimbus obsidian prairie quartz river sierra tundra umber valley willow xenon yarrow "
    "zephyr acorn birch canyon delta estuary falcon glacier heron islet jasper kestrel "
    "lichen marsh nectar orchid pebble quill reef sorrel thistle upland vesper walnut "
    "yew zinnia alder bramble cedar dahlia egret fern grove hazel iris lotus maple"
).split()

TOOLS = [
    ("execute-cli", "Execute", "Execute", "Execute a shell command.", "execute", True),
    ("glob-search-cli", "Glob", "Glob", "Advanced file path search using glob patterns.", "read", True),
    ("grep_tool_cli", "Grep", "Grep", "High-performance file content search.", "read", True),
    ("ls-cli", "LS", "LS", "List the contents of a directory.", "read", True),
    ("read-cli", "Read", "Read", "Read the contents of a file.", "read", True),
    ("edit-cli", "Edit", "Edit", "Performs exact string replacement in a file.", "edit", False),
    ("create-cli", "Create", "Create", "Writes a file to the local filesystem.", "edit", False),
]

DIRECTIVE_RE = re.compile(r"\[\[([A-Za-z_]+)(?::([^\]]*))?\]\]")
CALL_RE = re.compile(r"\[\[call:([A-Za-z0-9_.-]+):(\{.*?\})\]\]")
SESSION_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")


# --------------------------------------------------------------------------------------
# small helpers


def now_ms() -> int:
    return int(time.time() * 1000)


def iso_now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%03dZ" % (int(t * 1000) % 1000)


def new_id() -> str:
    return str(uuid.uuid4())


def dumps(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def usage(inp: int = 0, out: int = 0, cache_read: int = 0, cache_creation: int = 0, credits: float = 0) -> dict:
    return {
        "inputTokens": inp,
        "outputTokens": out,
        "cacheCreationTokens": cache_creation,
        "cacheReadTokens": cache_read,
        "thinkingTokens": 0,
        "factoryCredits": credits,
    }


def add_usage(a: dict, b: dict) -> dict:
    out = {k: int(a.get(k, 0)) + int(b.get(k, 0)) for k in usage()}
    out["factoryCredits"] = (a.get("factoryCredits") or 0) + (b.get("factoryCredits") or 0)
    return out


def zod_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def model_entry(model_id: str) -> dict:
    name = model_id.split(":", 1)[-1]
    display = " ".join(p[:1].upper() + p[1:] for p in re.split(r"[-_\s]+", name) if p) or model_id
    entry = {
        "id": model_id,
        "displayName": display,
        "shortDisplayName": display,
        "modelProvider": "generic-chat-completion-api",
        "supportedReasoningEfforts": ["none", "low", "medium", "high"],
        "defaultReasoningEffort": "none",
        "isCustom": True,
        "noImageSupport": not supports_images(model_id),
    }
    if not model_id.startswith("custom:"):  # a Factory model, as droid lists them
        entry.update(modelId=model_id, modelProvider="anthropic", isCustom=False, disabled=False)
        multipliers = dict(p.split("=", 1) for p in os.environ.get("FAKE_DROID_MULTIPLIERS", "").split(",") if "=" in p)
        if multipliers.get(model_id):
            entry["tokenMultiplier"] = float(multipliers[model_id])
    return entry


def supports_images(model_id: str) -> bool:
    """FAKE_DROID_VISION_MODELS (comma-separated ids) if set, else: the id contains "vision"
    (droid 0.225.2 treats a BYOK model without "noImageSupport": false as one without)."""
    listed = os.environ.get("FAKE_DROID_VISION_MODELS")
    if listed is not None:
        return model_id in {m.strip() for m in listed.split(",") if m.strip()}
    return "vision" in model_id


def model_ids() -> list[str]:
    ids = list(BASE_MODELS)
    for part in os.environ.get("FAKE_DROID_MODELS", "").split(","):
        part = part.strip()
        if part and part not in ids:
            ids.append(part)
    return ids


def available_models() -> list[dict]:
    return [model_entry(m) for m in model_ids()]


def answer_words(seed: str, count: int) -> list[str]:
    """Deterministic words from the seed; no word repeats within an answer."""
    words: list[str] = []
    i = 0
    while len(words) < count and i < 64:
        digest = hashlib.sha256(f"{i}:{seed}".encode("utf-8", "replace")).digest()
        for b in digest:
            w = WORDS[b % len(WORDS)]
            if w not in words:
                words.append(w)
                if len(words) == count:
                    break
        i += 1
    return words


def parse_directives(text: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for m in DIRECTIVE_RE.finditer(text):
        found[m.group(1).lower()] = (m.group(2) or "").strip()
    return found


# --------------------------------------------------------------------------------------
# attachments and structured output (as droid 0.225.2 does them: tests/fixtures/rpc_attach_*,
# rpc_structured_*)

IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMAGE_NOT_SHOWN = "[Image not shown: this model does not support image inputs]"
MEDIA_LIMIT = 10  # droid keeps at most 10 images upstream; over it, the oldest 5 become placeholders
MEDIA_LIMIT_REMINDER = (
    "<system-reminder>Media context limit: at most 10 images remain available; whenever later reads exceed "
    "this limit, the oldest 5 images are replaced with placeholders as a batch. Before reading more media, "
    "preserve the needed information as text. Do not repeatedly re-read evicted files; summarize or batch the "
    "work instead.</system-reminder>"
)
ATTEMPTS_RE = re.compile(r"\[\[attempts:(.*)\]\]", re.DOTALL)
JSON_RE = re.compile(r"\[\[json:(.*)\]\]", re.DOTALL)
SCHEMA_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
STRUCTURED_ATTEMPTS = 3  # the first answer and droid's two retries
BYOK_TAIL = "\n\nIf this persists, verify your custom model configuration in settings."


def lenient_b64decode(data: str) -> bytes:
    """Node's Buffer.from(data, "base64"): characters outside the alphabet are skipped."""
    import base64

    clean = re.sub(r"[^A-Za-z0-9+/]", "", data.replace("-", "+").replace("_", "/"))
    clean = clean[: len(clean) - (len(clean) % 4 == 1)]
    return base64.b64decode(clean + "=" * (-len(clean) % 4))


def png_problem(data: bytes) -> str | None:
    """pngjs's complaint about data that should be a PNG (None: it reads)."""
    import struct

    if not data or (len(data) < len(PNG_SIGNATURE) and PNG_SIGNATURE.startswith(data)):
        return "There are some read requests waitng on finished stream"
    if not data.startswith(PNG_SIGNATURE):
        return "unrecognised content at end of stream"
    at = len(PNG_SIGNATURE)
    while True:
        if at + 8 > len(data):
            return "There are some read requests waitng on finished stream"
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        if at + 12 + length > len(data):
            return "There are some read requests waitng on finished stream"
        at += 12 + length
        if kind == b"IEND":
            return None


def image_problem(data: bytes, media_type: str) -> str | None:
    """Why droid cannot take this image (it decodes, scales and re-encodes every image)."""
    if media_type == "image/png":
        return png_problem(data)
    if media_type == "image/jpeg":
        return None if data.startswith(b"\xff\xd8") else "SOI not found"
    return "Unsupported image type for compression. Only PNG and JPEG images are supported."


def params_problems(params: dict) -> list[str]:
    """droid's zod complaints about add_user_message's images / files / outputFormat."""
    out: list[str] = []
    images = params.get("images")
    if images is not None:
        if not isinstance(images, list):
            out.append(f"params.images: Expected array, received {zod_type(images)}")
        else:
            for i, image in enumerate(images):
                where = f"params.images.{i}"
                if not isinstance(image, dict):
                    out.append(f"{where}: Expected object, received {zod_type(image)}")
                    continue
                if image.get("type") != "base64":
                    out.append(f'{where}.type: Invalid literal value, expected "base64"')
                if not isinstance(image.get("data"), str):
                    out.append(f"{where}.data: " + ("Required" if "data" not in image
                                                   else f"Expected string, received {zod_type(image['data'])}"))
                media = image.get("mediaType")
                if media is None:
                    out.append(f"{where}.mediaType: Required")
                elif media not in IMAGE_TYPES:
                    out.append(f"{where}.mediaType: Invalid enum value. Expected "
                               + " | ".join(f"'{t}'" for t in IMAGE_TYPES) + f", received '{media}'")
    files = params.get("files")
    if files is not None:
        if not isinstance(files, list):
            out.append(f"params.files: Expected array, received {zod_type(files)}")
        else:
            for i, doc in enumerate(files):
                ok = isinstance(doc, dict) and isinstance(doc.get("data"), str) and (
                    (doc.get("type") == "base64" and doc.get("mediaType") == "application/pdf")
                    or (doc.get("type") == "text" and doc.get("mediaType") == "text/plain"))
                if not ok:
                    out.append(f"params.files.{i}: Invalid input")
    fmt = params.get("outputFormat")
    if fmt is not None:
        if not isinstance(fmt, dict):
            out.append(f"params.outputFormat: Expected object, received {zod_type(fmt)}")
        else:
            if fmt.get("type") != "json_schema":
                out.append('params.outputFormat.type: Invalid literal value, expected "json_schema"')
            if "schema" not in fmt:
                out.append("params.outputFormat.schema: Required")
            elif not isinstance(fmt["schema"], dict):
                out.append(f"params.outputFormat.schema: Expected object, received {zod_type(fmt['schema'])}")
    return out


def schema_is_valid(schema: object) -> bool:
    """A small stand-in for droid's schema compiler (ajv): known types, well-formed keywords."""
    if not isinstance(schema, dict):
        return False
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
    if any(k not in SCHEMA_TYPES for k in kinds):
        return False
    props = schema.get("properties")
    if props is not None and (not isinstance(props, dict) or not all(schema_is_valid(s) for s in props.values())):
        return False
    required = schema.get("required")
    if required is not None and (not isinstance(required, list) or not all(isinstance(r, str) for r in required)):
        return False
    if "items" in schema and not schema_is_valid(schema["items"]):
        return False
    if "enum" in schema and not isinstance(schema["enum"], list):
        return False
    extra = schema.get("additionalProperties")
    return extra is None or isinstance(extra, bool) or schema_is_valid(extra)


def schema_instance(schema: object, depth: int = 0) -> object:
    """A small value that satisfies a simple schema (the same as tests/fakellm.py's json scenario)."""
    if not isinstance(schema, dict) or depth > 8:
        return {}
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), kind[0] if kind else "object")
    if kind == "object" or (kind is None and "properties" in schema):
        props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        return {name: schema_instance(sub, depth + 1) for name, sub in props.items()}
    if kind == "array":
        return [schema_instance(schema.get("items"), depth + 1)] if isinstance(schema.get("items"), dict) else []
    return {"string": "sample", "integer": 1, "number": 1.5, "boolean": True, "null": None}.get(kind, {})


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def schema_errors(schema: object, value: object, path: str = "") -> list[str]:
    """ajv-style errors ("/city must be string", "/ must have required property 'temp'")."""
    if not isinstance(schema, dict):
        return []
    where = path or "/"
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        have = _json_kind(value)
        if not any(k == have or (k == "number" and have == "integer") for k in kinds):
            return [f"{where} must be {','.join(kinds)}"]
    errors: list[str] = []
    if "const" in schema and value != schema["const"]:
        errors.append(f"{where} must be equal to constant")
    if isinstance(schema.get("enum"), list) and value not in schema["enum"]:
        errors.append(f"{where} must be equal to one of the allowed values")
    if isinstance(value, dict):
        for name in schema.get("required") or []:
            if name not in value:
                errors.append(f"{where} must have required property '{name}'")
        props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        if schema.get("additionalProperties") is False and any(k not in props for k in value):
            errors.append(f"{where} must NOT have additional properties")
        for name, sub in props.items():
            if name in value:
                errors += schema_errors(sub, value[name], f"{path}/{name}")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            errors += schema_errors(schema["items"], item, f"{path}/{i}")
    return errors


def structured_problem(text: str, schema: dict) -> tuple[object, str | None]:
    """(the parsed answer, droid's validation error or None)."""
    try:
        value = json.loads(text)
    except ValueError:
        stripped = text.strip()
        word = re.match(r"[A-Za-z_$][\w$]*", stripped)
        if not stripped:
            detail = "Unexpected EOF"
        elif word and word.group(0) not in ("true", "false", "null"):
            detail = f'Unexpected identifier "{word.group(0)}"'
        else:
            detail = f"Unrecognized token '{stripped[0]}'"
        return None, f"Final response must be valid JSON: JSON Parse error: {detail}"
    if not isinstance(value, dict):
        return value, "Structured output must be a JSON object."
    errors = schema_errors(schema, value)
    return value, "; ".join(errors) if errors else None


class RpcError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --------------------------------------------------------------------------------------
# output


class Out:
    """Serialized, flushed, line-at-a-time writes to stdout."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.buf = sys.stdout.buffer

    def raw(self, data: bytes) -> None:
        with self.lock:
            try:
                self.buf.write(data)
                self.buf.flush()
            except (BrokenPipeError, ValueError, OSError):
                os._exit(0)

    def send(self, obj: object) -> None:
        self.raw(dumps(obj).encode("utf-8") + b"\n")


def env_notification(note: dict, session_id: str | None) -> dict:
    params: dict = {}
    if session_id is not None:
        params["sessionId"] = session_id
    params["notification"] = note
    return {
        "jsonrpc": "2.0",
        "type": "notification",
        "factoryApiVersion": API_VERSION,
        "factoryProtocolVersion": PROTOCOL_VERSION,
        "method": NOTIFY_METHOD,
        "params": params,
    }


def env_result(req_id: object, result: object) -> dict:
    return {
        "jsonrpc": "2.0",
        "type": "response",
        "factoryApiVersion": API_VERSION,
        "factoryProtocolVersion": PROTOCOL_VERSION,
        "id": req_id,
        "result": result,
    }


def env_error(req_id: object, code: int, message: str) -> dict:
    return {
        "jsonrpc": "2.0",
        "type": "response",
        "factoryApiVersion": API_VERSION,
        "factoryProtocolVersion": PROTOCOL_VERSION,
        "id": req_id,
        "error": {"code": code, "message": message},
    }


def env_request(method: str, req_id: str, params: dict) -> dict:
    return {
        "type": "request",
        "jsonrpc": "2.0",
        "factoryApiVersion": API_VERSION,
        "factoryProtocolVersion": PROTOCOL_VERSION,
        "method": method,
        "id": req_id,
        "params": params,
    }


# --------------------------------------------------------------------------------------
# session store (one JSON file per session)


class Store:
    def __init__(self) -> None:
        root = os.environ.get("FAKE_DROID_STATE") or os.path.join(
            os.path.expanduser("~"), ".fake-droid"
        )
        self.dir = os.path.join(root, "sessions")

    def _path(self, sid: str) -> str | None:
        if not SESSION_ID_RE.match(sid) or sid in (".", ".."):
            return None
        return os.path.join(self.dir, sid + ".json")

    def load(self, sid: str) -> dict | None:
        path = self._path(sid)
        if path is None:
            return None
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def save(self, sess: dict) -> None:
        path = self._path(sess["id"])
        if path is None:
            return
        os.makedirs(self.dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(sess, f, ensure_ascii=False)
        os.replace(tmp, path)


def full_settings(s: dict) -> dict:
    out = {
        "modelId": s["modelId"],
        "reasoningEffort": s["reasoningEffort"],
        "autonomyMode": s["autonomyMode"],
        "interactionMode": s["interactionMode"],
        "autonomyLevel": s["autonomyLevel"],
        "availableAutonomyLevels": list(AUTONOMY_LEVELS),
    }
    if s.get("tags"):
        out["tags"] = s["tags"]
    out.update(
        {
            "compactionThresholdCheckEnabled": True,
            "additionalToolIds": s.get("additionalToolIds", []),
            "enabledToolIds": s.get("enabledToolIds", []),
            "disabledToolIds": s.get("disabledToolIds", []),
            "restrictToolIds": s.get("restrictToolIds", []),
            "toolExecutionMode": "direct_only",
            "allowSubagentsInScripts": False,
        }
    )
    return out


def short_settings(s: dict) -> dict:
    out = {
        "modelId": s["modelId"],
        "reasoningEffort": s["reasoningEffort"],
        "autonomyMode": s["autonomyMode"],
        "interactionMode": s["interactionMode"],
        "autonomyLevel": s["autonomyLevel"],
        "availableAutonomyLevels": list(AUTONOMY_LEVELS),
        "compactionThresholdCheckEnabled": True,
    }
    if s.get("tags"):
        out["tags"] = s["tags"]
    return out


def update_settings_form(s: dict) -> dict:
    return {
        "modelId": s["modelId"],
        "reasoningEffort": s["reasoningEffort"],
        "autonomyMode": s["autonomyMode"],
        "interactionMode": s["interactionMode"],
        "autonomyLevel": s["autonomyLevel"],
        "availableAutonomyLevels": list(AUTONOMY_LEVELS),
        "additionalToolIds": s.get("additionalToolIds", []),
        "enabledToolIds": s.get("enabledToolIds", []),
        "disabledToolIds": s.get("disabledToolIds", []),
        "restrictToolIds": s.get("restrictToolIds", []),
        "compactionThresholdCheckEnabled": True,
    }


def is_real_user_message(m: dict) -> bool:
    return m.get("role") == "user" and "interactionMode" in m


# --------------------------------------------------------------------------------------
# turns


class Turn:
    def __init__(self, session: dict, text: str, request_id: object) -> None:
        self.session = session
        self.text = text
        self.request_id = request_id
        self.wake = threading.Event()
        self.cancelled = False
        self.started = time.monotonic()
        self.usage_override: tuple[float, ...] | None = None
        self.user_id = ""
        self.images: list[dict] = []  # add_user_message's images, files and outputFormat.schema
        self.files: list[dict] = []
        self.schema: dict | None = None


class Server:
    def __init__(self) -> None:
        self.out = Out()
        self.store = Store()
        self.host_id = str(uuid.uuid5(uuid.NAMESPACE_DNS, "fake-droid." + os.uname().nodename))
        self.lock = threading.RLock()
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.turn_q: queue.SimpleQueue = queue.SimpleQueue()
        self.session: dict | None = None
        self.context_pending = False
        self.pending_turns = 0
        self.current: Turn | None = None
        self.exit_after = False  # stdin EOF or SIGTERM during a turn
        self.fast = False  # SIGTERM: fast-forward the running turn
        self.term_flag = False
        self.running = False
        self.pending_requests: dict[object, dict] = {}
        self.log_path = os.environ.get("FAKE_DROID_LOG") or None
        self.mcp_servers: list[dict] = []  # as the last initialize/load_session gave them
        self.image_dir: str | None = None  # $HOME/.factory/temp/images/<8 hex>, one per process
        self.image_files: list[str] = []

    def store_image(self, data: bytes, media_type: str) -> str:
        """Where droid keeps an attached image while the process lives (removed at exit)."""
        if self.image_dir is None:
            self.image_dir = os.path.join(os.path.expanduser("~"), ".factory", "temp", "images", new_id()[:8])
        os.makedirs(self.image_dir, exist_ok=True)
        path = os.path.join(self.image_dir, f"{new_id()}.{media_type.split('/')[1]}")
        with open(path, "wb") as f:
            f.write(data)
        self.image_files.append(path)
        return path

    def remove_images(self) -> None:
        for path in self.image_files:
            try:
                os.unlink(path)
            except OSError:
                pass
        if self.image_dir is not None:
            try:
                os.rmdir(self.image_dir)
            except OSError:
                pass

    # ---- infrastructure

    def shutdown(self, code: int) -> None:
        self.remove_images()  # droid's exit hook; a killed (or crashed) process leaves them
        got = self.out.lock.acquire(timeout=2)
        try:
            sys.stdout.buffer.flush()
        except Exception:
            pass
        if got:
            pass  # keep the lock: nothing else may write a partial line
        os._exit(code)

    def notify(self, note: dict, session_id: str | None) -> None:
        self.out.send(env_notification(note, session_id))

    def log_method(self, method: str) -> None:
        if not self.log_path:
            return
        try:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(method + "\n")
        except OSError:
            pass

    def on_signal(self, signum: int, frame: object) -> None:
        if not self.running:
            os._exit(0)
        self.term_flag = True
        self.inbox.put(("signal", signum))

    def reader(self) -> None:
        stdin = sys.stdin.buffer
        while True:
            try:
                line = stdin.readline()
            except Exception:
                line = b""
            if not line:
                self.inbox.put(("eof", None))
                return
            self.inbox.put(("line", line))

    def run(self) -> None:
        self.running = True
        threading.Thread(target=self.reader, name="stdin-reader", daemon=True).start()
        threading.Thread(target=self.turn_worker, name="turn-worker", daemon=True).start()
        while True:
            try:
                kind, payload = self.inbox.get(timeout=0.05)
            except queue.Empty:
                if self.term_flag:
                    self.term_flag = False
                    self.on_term()
                continue
            if kind == "line":
                self.handle_line(payload)
            elif kind == "eof":
                self.on_eof()
            elif kind == "signal":
                self.term_flag = False
                self.on_term()

    def on_eof(self) -> None:
        with self.lock:
            idle = self.pending_turns == 0
            if not idle:
                self.exit_after = True
                if self.current is not None:
                    self.current.wake.set()
            sid = self.session["id"] if self.session else ""
        if idle:
            self.notify({"type": "droid_working_state_changed", "newState": "idle"}, sid)
            self.shutdown(0)

    def on_term(self) -> None:
        with self.lock:
            if self.pending_turns == 0:
                self.shutdown(0)
            already = self.exit_after and self.fast
            self.exit_after = True
            self.fast = True
            cur = self.current
            sid = cur.session["id"] if cur else (self.session["id"] if self.session else "")
        if cur is not None:
            cur.wake.set()
        if not already:
            self.notify({"type": "droid_working_state_changed", "newState": "idle"}, sid)

    # ---- request handling

    def handle_line(self, line: bytes) -> None:
        text = line.strip()
        if not text:
            return
        try:
            msg = json.loads(text)
        except ValueError:
            self.out.send(env_error(None, -32700, "Invalid JSON"))
            return
        if not isinstance(msg, dict) or "type" not in msg or "factoryApiVersion" not in msg:
            self.out.send(env_error(None, -32700, "Invalid JSON-RPC message"))
            return
        mtype = msg.get("type")
        if mtype == "response":
            self.route_response(msg)
            return
        if mtype == "notification":
            return
        method = msg.get("method")
        if mtype != "request" or not isinstance(method, str):
            self.out.send(env_error(None, -32700, "Invalid JSON-RPC message"))
            return
        req_id = msg.get("id")
        self.log_method(method)
        params = msg.get("params")
        if params is None:
            params = {}
        handler = METHODS.get(method)
        post = None
        try:
            if handler is None:
                raise RpcError(-32601, f"Method not found: {method}")
            if not isinstance(params, dict):
                raise RpcError(
                    -32602,
                    f"Invalid request for {method}: params: Expected object, received {zod_type(params)}",
                )
            result = handler(self, params, req_id)
            if isinstance(result, tuple):
                result, post = result
        except RpcError as e:
            self.out.send(env_error(req_id, e.code, e.message))
            return
        except Exception as e:  # a bug in the fake: report it like an internal error
            sys.stderr.write(f"fake_droid: internal error in {method}: {e!r}\n")
            sys.stderr.flush()
            self.out.send(env_error(req_id, -32603, f"Internal error: {e}"))
            return
        self.out.send(env_result(req_id, result))
        if post is not None:
            post()

    def route_response(self, msg: dict) -> None:
        with self.lock:
            slot = self.pending_requests.get(msg.get("id"))
            if slot is None:
                return
            slot["result"] = msg.get("result")
            slot["error"] = msg.get("error")
            slot["done"] = True
            turn = slot["turn"]
        turn.wake.set()

    def require_session(self) -> dict:
        if self.session is None:
            raise RpcError(-32603, "No active session. Call initialize_session or load_session first.")
        return self.session

    def m_initialize_session(self, params: dict, req_id: object):
        method = "droid.initialize_session"
        if isinstance(params.get("mcpServers"), list):
            self.mcp_servers = params["mcpServers"]
        for key in ("machineId", "cwd"):
            value = params.get(key)
            if not isinstance(value, str):
                detail = "Required" if key not in params else f"Expected string, received {zod_type(value)}"
                raise RpcError(-32602, f"Invalid request for {method}: params.{key}: {detail}")
        level = params.get("autonomyLevel", "off")
        if level is None:
            level = "off"
        if level not in AUTONOMY_LEVELS:
            raise RpcError(
                -32602,
                f"Invalid request for {method}: params.autonomyLevel: Invalid enum value. "
                f"Expected 'off' | 'low' | 'medium' | 'high', received '{level}'",
            )
        cwd = params["cwd"]
        if not os.path.isdir(cwd):
            raise RpcError(-32603, "Working directory does not exist")
        model = params.get("modelId")
        if not isinstance(model, str) or not model:
            model = model_ids()[0]
        effort = params.get("reasoningEffort")
        if not isinstance(effort, str) or not effort:
            effort = "none"
        interaction = params.get("interactionMode")
        if not isinstance(interaction, str) or not interaction:
            interaction = "auto"
        settings = {
            "modelId": model,
            "reasoningEffort": effort,
            "autonomyMode": AUTONOMY_MODE[level],
            "interactionMode": interaction,
            "autonomyLevel": level,
        }
        for key in ("additionalToolIds", "enabledToolIds", "disabledToolIds", "restrictToolIds"):
            if isinstance(params.get(key), list):
                settings[key] = params[key]
        if isinstance(params.get("tags"), list) and params["tags"]:
            settings["tags"] = params["tags"]
        system_prompt = params.get("systemPrompt")
        if isinstance(system_prompt, dict):
            system_prompt = system_prompt.get("append") or "preset:" + str(
                system_prompt.get("preset", "droid")
            )
        elif not isinstance(system_prompt, str) or not system_prompt:
            system_prompt = None
        sid = params.get("sessionId")
        if not isinstance(sid, str) or not SESSION_ID_RE.match(sid):
            sid = new_id()
        ts = now_ms()
        sess = {
            "id": sid,
            "cwd": cwd,
            "machineId": params["machineId"],
            "hostId": self.host_id,
            "title": None,
            "createdAt": ts,
            "updatedAt": ts,
            "systemPrompt": system_prompt,
            "settings": settings,
            "messages": [],
            "tokenUsage": usage(),
            "lastCallTokenUsage": {"inputTokens": 0, "outputTokens": 0, "cacheReadTokens": 0},
        }
        with self.lock:
            self.store.save(sess)
            self.session = sess
            self.context_pending = True
        self.notify({"type": "settings_updated", "settings": short_settings(settings)}, None)
        return {
            "sessionId": sid,
            "hostId": self.host_id,
            "session": {"messages": []},
            "settings": full_settings(settings),
            "availableModels": available_models(),
        }

    def m_load_session(self, params: dict, req_id: object):
        sid = params.get("sessionId")
        if not isinstance(sid, str):
            detail = "Required" if "sessionId" not in params else f"Expected string, received {zod_type(sid)}"
            raise RpcError(-32602, f"Invalid request for droid.load_session: params.sessionId: {detail}")
        if isinstance(params.get("mcpServers"), list):
            self.mcp_servers = params["mcpServers"]
        sess = self.store.load(sid)
        shown: list | None = None
        if sess is None:
            found = self.load_minted(sid)
            if found is None:
                raise RpcError(-32004, "Session not found")
            sess, shown = found
        with self.lock:
            self.session = sess
            self.context_pending = True
        if os.path.isdir(sess.get("cwd") or ""):
            os.chdir(sess["cwd"])  # as droid does: the process moves into the session's cwd
        settings = sess["settings"]
        self.notify({"type": "settings_updated", "settings": short_settings(settings)}, None)
        tu = sess.get("tokenUsage") or usage()
        if shown is None:
            shown = [self.load_form(m) for m in sess["messages"]]
        session_obj: dict = {"messages": shown}
        if sess.get("title"):
            session_obj["title"] = sess["title"]
        return {
            "session": session_obj,
            "hasOlderMessages": False,
            "hostId": sess.get("hostId", self.host_id),
            "updatedAt": int(sess.get("updatedAt", now_ms()) // 1000),
            "settings": {**full_settings(settings),
                         **({"systemPrompt": sess["systemPrompt"]} if sess.get("systemPrompt") else {})},
            "availableModels": available_models(),
            "isAgentLoopInProgress": False,
            "workingState": "idle",
            "cwd": sess.get("cwd", os.getcwd()),
            "tokenUsage": tu,
            "inclusiveTokenUsage": tu,
            "lastCallTokenUsage": sess.get("lastCallTokenUsage")
            or {"inputTokens": 0, "outputTokens": 0, "cacheReadTokens": 0},
        }

    def load_minted(self, sid: str) -> tuple[dict, list] | None:
        """A session written the way droidpool mints them (droid's own layout: a folder named
        after the cwd, ``<id>.settings.json`` and ``<id>.jsonl`` holding a session_start and one
        empty context message), as droid 0.225.2 loads it. FAKE_DROID_MINT=ignore: not found
        (a droid that does not know the format); =stale: loads it but keeps the previous
        conversation in memory (the leak the self-test must catch)."""
        mode = os.environ.get("FAKE_DROID_MINT", "")
        root = os.path.join(os.path.expanduser("~"), ".factory", "sessions")
        if mode == "ignore" or not SESSION_ID_RE.match(sid) or not os.path.isdir(root):
            return None
        folder = next((f for f in sorted(os.listdir(root)) if os.path.isfile(os.path.join(root, f, sid + ".jsonl"))),
                      None)
        if folder is None:
            return None
        try:
            with open(os.path.join(root, folder, sid + ".jsonl"), encoding="utf-8") as f:
                lines = [json.loads(line) for line in f if line.strip()]
            with open(os.path.join(root, folder, sid + ".settings.json"), encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError):
            return None
        start, messages = (lines[0] if lines else {}), lines[1:]
        cwd = start.get("cwd") if isinstance(start, dict) else None
        if not isinstance(cwd, str) or len(messages) != 1 or messages[0].get("message", {}).get("content"):
            return None
        if folder != cwd.replace("/", "-"):
            # droid derives the file's path from the session's cwd (observed: exit 1).
            self.crash(f"Critical error: ENOENT: no such file or directory, lstat "
                       f"'{os.path.join(root, cwd.replace('/', '-'), sid + '.jsonl')}'")
        level = doc.get("autonomyLevel") if doc.get("autonomyLevel") in AUTONOMY_LEVELS else "off"
        settings = {
            "modelId": doc.get("model") or model_ids()[0],
            "reasoningEffort": doc.get("reasoningEffort") or "none",
            "autonomyMode": AUTONOMY_MODE[level],
            "interactionMode": doc.get("interactionMode") or "auto",
            "autonomyLevel": level,
            "disabledToolIds": doc.get("disabledToolIds") or [],
        }
        ts = now_ms()
        sess = {
            "id": sid, "cwd": cwd, "machineId": "droidpool", "hostId": self.host_id,
            "title": start.get("title") if start.get("isSessionTitleManuallySet") else None,
            "createdAt": ts, "updatedAt": ts, "systemPrompt": doc.get("systemPrompt"), "settings": settings,
            "messages": [], "tokenUsage": usage(),
            "lastCallTokenUsage": {"inputTokens": 0, "outputTokens": 0, "cacheReadTokens": 0},
        }
        shown = [{"id": messages[0].get("id", "context-" + new_id()), "createdAt": ts, "updatedAt": ts,
                  "role": "user", "content": [], "visibility": "llm_only"}]
        if mode == "stale" and self.session is not None:
            sess["messages"] = list(self.session["messages"])
            shown = [self.load_form(m) for m in sess["messages"]] + shown
        self.store.save(sess)
        return sess, shown

    @staticmethod
    def load_form(m: dict) -> dict:
        """A stored message in the key order load_session uses."""
        out = {"id": m["id"]}
        if m.get("parentId") not in (None, "root"):
            out["parentId"] = m["parentId"]
        out["createdAt"] = m["createdAt"]
        out["updatedAt"] = m["updatedAt"]
        out["role"] = m["role"]
        out["content"] = m["content"]
        for key in (
            "visibility",
            "interactionMode",
            "chatCompletionReasoningField",
            "chatCompletionReasoningContent",
            "openaiMessageId",
            "modelId",
            "reasoningEffort",
        ):
            if key in m:
                out[key] = m[key]
        return out

    def m_add_user_message(self, params: dict, req_id: object):
        sess = self.require_session()
        text = params.get("text")
        if not isinstance(text, str):
            detail = "Required" if "text" not in params else f"Expected string, received {zod_type(text)}"
            raise RpcError(-32602, f"Invalid request for droid.add_user_message: params.text: {detail}")
        problems = params_problems(params)
        if problems:
            raise RpcError(-32602, "Invalid request for droid.add_user_message: " + "; ".join(problems))
        turn = Turn(sess, text, req_id)
        turn.images = list(params.get("images") or [])
        turn.files = list(params.get("files") or [])
        if isinstance(params.get("outputFormat"), dict):
            turn.schema = params["outputFormat"]["schema"]
        with self.lock:
            self.pending_turns += 1

        def post() -> None:
            self.turn_q.put(turn)

        return {}, post

    def m_interrupt_session(self, params: dict, req_id: object):
        with self.lock:
            cur = self.current
        if cur is not None:
            cur.cancelled = True
            cur.wake.set()
        return {}

    def m_update_session_settings(self, params: dict, req_id: object):
        sess = self.require_session()
        with self.lock:
            s = sess["settings"]
            for key in ("modelId", "reasoningEffort", "interactionMode"):
                if isinstance(params.get(key), str) and params[key]:
                    s[key] = params[key]
            level = params.get("autonomyLevel")
            if isinstance(level, str):
                if level not in AUTONOMY_LEVELS:
                    raise RpcError(
                        -32602,
                        "Invalid request for droid.update_session_settings: params.autonomyLevel: "
                        f"Invalid enum value. Expected 'off' | 'low' | 'medium' | 'high', received '{level}'",
                    )
                s["autonomyLevel"] = level
                s["autonomyMode"] = AUTONOMY_MODE[level]
            for key in ("additionalToolIds", "enabledToolIds", "disabledToolIds", "restrictToolIds"):
                if isinstance(params.get(key), list):
                    s[key] = params[key]
            if isinstance(params.get("tags"), list):
                s["tags"] = params["tags"]
            sess["updatedAt"] = now_ms()
            self.store.save(sess)
            short, medium = short_settings(s), update_settings_form(s)
        self.notify({"type": "settings_updated", "settings": short}, None)
        self.notify({"type": "settings_updated", "requestId": req_id, "settings": medium}, None)
        return {}

    def m_list_models(self, params: dict, req_id: object):
        models = []
        for m in available_models():
            m["disabled"] = False
            models.append(m)
        return {"models": models}

    def m_list_tools(self, params: dict, req_id: object):
        return {
            "tools": [
                {
                    "id": tid,
                    "llmId": llm,
                    "displayName": disp,
                    "description": desc,
                    "category": cat,
                    "defaultAllowed": allowed,
                    "currentlyAllowed": allowed,
                }
                for tid, llm, disp, desc, cat, allowed in TOOLS
            ]
        }

    def m_get_context_stats(self, params: dict, req_id: object):
        chars = 0
        if self.session is not None:
            for m in self.session["messages"]:
                for block in m.get("content", []):
                    chars += len(str(block.get("text", "")))
        used = 6000 + chars // 4
        limit = 250000
        return {
            "used": used,
            "remaining": limit - used,
            "limit": limit,
            "accuracy": "estimated",
            "updatedAt": iso_now(),
        }

    def m_rename_session(self, params: dict, req_id: object):
        # Real droid 0.225.2: {"success": true}; a title set before the first message stops
        # its title request upstream (session_title_updated with updateType manual_rename).
        session = self.require_session()
        title = params.get("title")
        if not isinstance(title, str):
            raise RpcError(-32602, "Invalid request for droid.rename_session: params.title: Expected string")
        session["title"] = title
        self.store.save(session)
        self.notify({"type": "session_title_updated", "title": title, "updateType": "manual_rename"},
                    session["id"])
        return {"success": True}

    def m_close_session(self, params: dict, req_id: object):
        return {}, lambda: self.shutdown(0)

    # ---- the turn worker

    def turn_worker(self) -> None:
        while True:
            turn = self.turn_q.get()
            with self.lock:
                self.current = turn
            try:
                self.run_turn(turn)
            except Exception as e:  # keep the process alive; report on stderr
                import traceback

                sys.stderr.write(f"fake_droid: turn failed: {e!r}\n{traceback.format_exc()}")
                sys.stderr.flush()
            with self.lock:
                self.current = None
                self.pending_turns -= 1
                leave = self.exit_after
            if leave:
                self.shutdown(0)

    def pause(self, turn: Turn, seconds: float) -> None:
        if self.fast or turn.cancelled or seconds <= 0:
            return
        turn.wake.clear()
        if self.fast or turn.cancelled:
            return
        turn.wake.wait(seconds)

    def wait_until(self, turn: Turn, done) -> None:
        """Block until done() or the turn is cancelled / the process must exit."""
        while not (done() or turn.cancelled or self.exit_after):
            turn.wake.wait(0.5)
            turn.wake.clear()

    def save(self, sess: dict) -> None:
        with self.lock:
            sess["updatedAt"] = now_ms()
            self.store.save(sess)

    def crash(self, why: str) -> None:
        try:
            sys.stderr.write(f"fake_droid: simulated crash ({why})\n")
            sys.stderr.flush()
        except Exception:
            pass
        os._exit(1)

    def run_turn(self, turn: Turn) -> None:
        sess = turn.session
        sid = sess["id"]
        settings = sess["settings"]
        directives = parse_directives(turn.text)

        def N(note: dict) -> None:
            self.notify(note, sid)

        def state(new_state: str) -> None:
            N({"type": "droid_working_state_changed", "newState": new_state})

        # droid decodes, scales and re-encodes every image before the turn starts: a bad one ends
        # it with no message at all (recorded: rpc_attach_bad_*.stdout.jsonl)
        images: list[tuple[dict, str]] = []  # (content block, file path)
        for image in turn.images:
            data = lenient_b64decode(image["data"])
            problem = image_problem(data, image["mediaType"])
            if problem is None and "image_error" in directives:
                problem = directives["image_error"] or "Unable to compress image below provider size limit"
            if problem is not None:
                self.attachment_failure(turn, sess, problem)
                return
            block = {"type": "image", "source": {"type": "base64", "data": image["data"],
                                                 "mediaType": image["mediaType"]}}
            images.append((block, self.store_image(data, image["mediaType"])))

        state("streaming_assistant_message")
        if turn.schema is not None and not schema_is_valid(turn.schema):
            self.fail_turn(turn, sess, {"user_id": None}, "schema")  # before any message (recorded)
            return
        ts = now_ms()
        user_id = new_id()
        turn.user_id = user_id
        with self.lock:
            parent = sess["messages"][-1]["id"] if sess["messages"] else "root"
            emit_context = self.context_pending and self.session is sess
            if emit_context:
                self.context_pending = False
        if emit_context:
            ctx = {
                "id": "context-" + user_id,
                "role": "user",
                "content": [],
                "visibility": "llm_only",
                "createdAt": ts,
                "updatedAt": ts,
                "parentId": parent,
            }
            N({"type": "create_message", "message": ctx})
            stored = dict(ctx)
            stored["content"] = [
                {
                    "type": "text",
                    "text": "<system-reminder>\nfake droid context: cwd="
                    + str(sess.get("cwd"))
                    + "\n</system-reminder>",
                }
            ]
            sess["messages"].append(stored)
            parent = ctx["id"]
        documents = [self.document_block(sess, doc) for doc in turn.files]
        user_msg = {
            "id": user_id,
            "role": "user",
            "content": [*(b for b, _ in images), *documents, {"type": "text", "text": turn.text}],
            "createdAt": ts,
            "updatedAt": ts,
            "interactionMode": settings.get("interactionMode", "auto"),
            "parentId": parent,
        }
        N({"type": "create_message", "message": user_msg, "requestId": turn.request_id})
        stored_user = user_msg
        if images:  # the session (and load_session) also holds the paths droid tells the LLM
            paths = "".join(f"- Image {i}: {path}\n" for i, (_, path) in enumerate(images, 1))
            reminder = (f"<system-reminder>Attached image local file paths:\n{paths}\nIf you launch a Task "
                        "subagent for which an attached image is relevant, pass the path(s) via the Task tool "
                        "`image_paths` field, not base64 data or image contents.</system-reminder>")
            stored_user = dict(user_msg, content=[*user_msg["content"][:-1], {"type": "text", "text": reminder},
                                                  user_msg["content"][-1]])
        sess["messages"].append(stored_user)
        answer_parent = user_id
        if images:
            available = sess.get("mediaAvailable", 0)
            now = available + len(images)
            while now > MEDIA_LIMIT:  # droid replaces the oldest 5 with placeholders upstream
                now -= 5
            sess["mediaAvailable"] = now
            if now == MEDIA_LIMIT and available != MEDIA_LIMIT:
                note = {"id": "__internal__system-reminder__" + new_id(), "role": "user", "content": [],
                        "visibility": "llm_only", "createdAt": ts, "updatedAt": ts, "parentId": user_id}
                N({"type": "create_message", "message": note})
                sess["messages"].append(dict(note, content=[{"type": "text", "text": MEDIA_LIMIT_REMINDER}]))
                answer_parent = note["id"]
        k = sum(1 for m in sess["messages"] if is_real_user_message(m))
        first_turn = k == 1 and not sess.get("title")
        if first_turn:
            sess["title"] = turn.text.strip()[:80] or "New session"
        self.save(sess)
        if first_turn:
            N({"type": "session_title_updated", "title": sess["title"], "updateType": "first_user_message"})

        seen = ""
        if images:
            seen = f" [images={len(images)}]" if supports_images(settings["modelId"]) \
                else f" [images={len(images)} not shown]"
        if turn.files:
            seen += " [files=" + ",".join(str(d.get("name") or "unknown") for d in turn.files) + "]"
        ctx_state = {"user_id": user_id, "k": k, "first": first_turn, "directives": directives,
                     "parent": answer_parent, "seen": seen}

        if "usage" in directives:
            try:
                parts = directives["usage"].split(",")
                turn.usage_override = (*(int(p) for p in parts[:4]), *(float(p) for p in parts[4:5]))
            except ValueError:
                pass

        state("thinking")

        if directives.get("crash") == "before":
            self.crash("[[crash:before]]")

        err = directives.get("error")
        if err in ("401", "429", "model"):
            self.fail_turn(turn, sess, ctx_state, err)
            return
        if "fail" in directives:
            self.fail_turn(turn, sess, ctx_state, "fail:" + (directives["fail"] or "error"))
            return

        if "hang" in directives:
            self.wait_until(turn, lambda: False)
            if turn.cancelled:
                self.finish_cancelled(turn, sess, user_id, None, "")
            else:
                self.complete(turn, sess, "process_exit", usage())
            return

        if "permission" in directives:
            self.permission_turn(turn, sess, ctx_state)
            return

        calls = CALL_RE.findall(turn.text)
        if calls:
            self.client_tools_turn(turn, sess, ctx_state, calls)
            return

        if turn.schema is not None:
            self.structured_turn(turn, sess, ctx_state)
            return

        self.answer(turn, sess, ctx_state, parent_id=answer_parent, extra=seen)

    # ---- turn pieces

    def build_deltas(self, sess: dict, ctx_state: dict, text: str, n: int, extra: str = "") -> list[str]:
        seed = DIRECTIVE_RE.sub("", text).strip() + f"#{ctx_state['k']}"
        words = answer_words(seed, max(8, 2 * n))
        chunks: list[list[str]] = [[] for _ in range(n)]
        for i, w in enumerate(words):
            chunks[i * n // len(words)].append(w)
        system = sess.get("systemPrompt")
        suffix = f"{extra} [system={system[:20] if system else 'none'}] [turns={ctx_state['k']}]"
        deltas = [" ".join(c) + " " for c in chunks[:-1]]
        deltas.append(" ".join(chunks[-1]) + suffix)
        deltas[0] = deltas[0][:1].upper() + deltas[0][1:]
        return deltas

    def answer(
        self,
        turn: Turn,
        sess: dict,
        ctx_state: dict,
        parent_id: str,
        extra: str = "",
        prior_usage: dict | None = None,
    ) -> None:
        sid = sess["id"]
        settings = sess["settings"]
        d = ctx_state["directives"]

        def N(note: dict) -> None:
            self.notify(note, sid)

        n = DEFAULT_DELTAS
        delay = DEFAULT_DELAY_S
        if "slow" in d:
            n = SLOW_DELTAS
            try:
                delay = max(0.0, float(d["slow"] or "100") / 1000.0)
            except ValueError:
                delay = 0.1
        deltas = self.build_deltas(sess, ctx_state, turn.text, n, extra)
        msg_id = new_id()
        block = 0
        thinking_text = None
        thinking_ms = 0

        if ctx_state["first"]:
            title = " ".join(deltas[0].split()[:4]) or "Fake answer"
            N({"type": "session_title_updated", "title": title, "updateType": "llm_generated"})

        if "reasoning" in d:
            t0 = time.monotonic()
            parts = ["Let me ", "think ", "about it."]
            for p in parts:
                self.pause(turn, delay)
                if turn.cancelled:
                    self.finish_cancelled(turn, sess, ctx_state["user_id"], None, "")
                    return
                N({"type": "thinking_text_delta", "messageId": msg_id, "blockIndex": 0, "textDelta": p})
            thinking_text = "".join(parts)
            thinking_ms = max(1, int((time.monotonic() - t0) * 1000))
            N({"type": "thinking_text_complete", "messageId": msg_id, "blockIndex": 0, "durationMs": thinking_ms})
            block = 1

        N({"type": "droid_working_state_changed", "newState": "streaming_assistant_message"})

        if d.get("error") == "500":
            for attempt in (1, 2):
                self.pause(turn, delay)
                if turn.cancelled:
                    self.finish_cancelled(turn, sess, ctx_state["user_id"], None, "")
                    return
                N(
                    {
                        "type": "assistant_text_delta",
                        "messageId": msg_id,
                        "blockIndex": block,
                        "textDelta": f"retracted-partial-{attempt} ",
                    }
                )
                self.pause(turn, delay)
                N({"type": "llm_retry", "attempt": attempt, "reason": "overloaded"})
                N({"type": "assistant_message_retracted", "messageId": msg_id})

        if "hang_mid" in d:
            self.pause(turn, delay)
            N({"type": "assistant_text_delta", "messageId": msg_id, "blockIndex": block, "textDelta": "partial "})
            self.wait_until(turn, lambda: False)
            if turn.cancelled:
                self.finish_cancelled(turn, sess, ctx_state["user_id"], msg_id, "partial ")
            else:
                self.complete(turn, sess, "process_exit", usage())
            return

        sent: list[str] = []
        for i, delta in enumerate(deltas):
            self.pause(turn, delay)
            if turn.cancelled:
                self.finish_cancelled(turn, sess, ctx_state["user_id"], msg_id, "".join(sent))
                return
            N({"type": "assistant_text_delta", "messageId": msg_id, "blockIndex": block, "textDelta": delta})
            sent.append(delta)
            if i == 0 and "huge" in d:
                self.emit_huge(sid)
            if i == 1 and "garbage" in d:
                self.out.raw(b"this is not json {garbage\n")
                self.out.send({"jsonrpc": "2.0", "kind": "mystery", "payload": {"x": 1, "y": [1, 2, 3]}})
            if i == 1 and "crash" in d and d["crash"] != "before":
                self.crash("[[crash]]")
        text = "".join(sent)
        N({"type": "assistant_text_complete", "messageId": msg_id, "blockIndex": block})
        ts = now_ms()
        content: list[dict] = []
        if thinking_text is not None:
            content.append(
                {
                    "type": "thinking",
                    "thinking": thinking_text,
                    "signature": "reasoning_content",
                    "signatureProvider": "generic-chat-completion-api",
                    "durationMs": thinking_ms,
                }
            )
        content.append({"type": "text", "text": text})
        msg = {
            "id": msg_id,
            "role": "assistant",
            "content": content,
            "createdAt": ts,
            "updatedAt": ts,
            "modelId": settings["modelId"],
            "reasoningEffort": settings["reasoningEffort"],
        }
        if thinking_text is not None:
            msg["chatCompletionReasoningField"] = "reasoning_content"
            msg["chatCompletionReasoningContent"] = thinking_text
        msg["openaiMessageId"] = "chatcmpl-fake1"
        msg["parentId"] = parent_id
        N({"type": "create_message", "message": msg})
        sess["messages"].append(msg)
        if turn.usage_override is not None:
            u = usage(*turn.usage_override)
        else:
            u = usage(100 + 2 * len(sess["messages"]), len(text.split()))
            if prior_usage is not None:
                u = add_usage(prior_usage, u)
        self.complete(turn, sess, "completed", u)

    def emit_huge(self, sid: str) -> None:
        note = {"type": "fake_huge_blob", "blob": ""}
        skeleton = dumps(env_notification(note, sid)).encode("utf-8")
        fill = max(0, HUGE_LINE_BYTES - len(skeleton))
        # hex digits: valid JSON, no escaping, deterministic
        unit = hashlib.sha256(b"fake-droid-huge").hexdigest()
        note["blob"] = (unit * (fill // len(unit) + 1))[:fill]
        self.out.send(env_notification(note, sid))

    def fail_turn(self, turn: Turn, sess: dict, ctx_state: dict, kind: str, turn_usage: dict | None = None) -> None:
        """A failed turn as droid ends one: an ``error`` notification, a ``user_only`` system
        message "BYOK Error: …", then ``agent_turn_completed`` with the reason. ``kind``: 401,
        429, model, schema (outputFormat's schema is not valid JSON Schema), structured:<error>
        (three answers failed the schema), fail:<reason>[:<message>] (any reason)."""
        sid = sess["id"]

        def N(note: dict) -> None:
            self.notify(note, sid)

        if kind == "401":
            message, upstream, reason, name = (
                "401 Invalid API key (fake)",
                "Invalid API key (fake)",
                "model_authentication_failed",
                "Error",
            )
        elif kind == "429":
            message, upstream, reason, name = (
                "429 Rate limit exceeded (fake)",
                "Rate limit exceeded (fake)",
                "model_rate_limited",
                "Error",
            )
            retract_id = new_id()
            for attempt in (1, 2):
                self.pause(turn, DEFAULT_DELAY_S)
                if turn.cancelled:
                    self.finish_cancelled(turn, sess, ctx_state["user_id"], None, "")
                    return
                N({"type": "llm_retry", "attempt": attempt, "reason": "rate_limited"})
                N({"type": "assistant_message_retracted", "messageId": retract_id})
        elif kind == "schema":
            message, upstream, reason, name = ("The requested structured output schema is invalid.", None,
                                               "structured_output_schema_invalid", "StructuredOutputError")
        elif kind.startswith("structured:"):
            message, upstream, reason, name = (kind.split(":", 1)[1], None, "structured_output_invalid",
                                               "StructuredOutputError")
        elif kind.startswith("fail:"):
            reason, _, message = kind[5:].partition(":")
            message = message or f"Simulated failure ({reason})"
            upstream, name = None, "StructuredOutputError" if reason.startswith("structured_output") else "Error"
        else:
            message, upstream, reason, name = (
                "Custom model configuration is unavailable",
                None,
                "error",
                "MetaError",
            )
        if not turn.user_id:  # failed before droid made the user message: the turn id is a fresh one
            turn.user_id = new_id()
        parent = ctx_state.get("user_id") or (sess["messages"][-1]["id"] if sess["messages"] else "root")
        N(
            {
                "type": "error",
                "message": message,
                "errorType": "Error",
                "timestamp": iso_now(),
                "error": {"name": name, "message": message},
            }
        )
        body = f"BYOK Error: {message}\n\n"
        if upstream:
            body += f"Upstream error: {upstream}\n\n"
        body += "If this persists, verify your custom model configuration in settings."
        ts = now_ms()
        N(
            {
                "type": "create_message",
                "message": {
                    "id": new_id(),
                    "role": "system",
                    "content": [{"type": "text", "text": body}],
                    "visibility": "user_only",
                    "createdAt": ts,
                    "updatedAt": ts,
                    "parentId": parent,
                },
            }
        )
        if turn.usage_override:
            turn_usage = usage(*turn.usage_override)
        self.complete(turn, sess, reason, turn_usage or usage())

    def attachment_failure(self, turn: Turn, sess: dict, problem: str) -> None:
        """An image droid cannot decode or shrink: no message, no working state; the turn ends
        (reason error, a turn id of its own), then an error notification, then a second response
        to the add_user_message request, an error this time (recorded: rpc_attach_bad_*)."""
        sid = sess["id"]
        total = sess.get("tokenUsage") or usage()
        self.notify({"type": "agent_turn_completed", "reason": "error", "turnId": new_id(), "tokenUsage": usage(),
                     "cumulativeTokenUsage": total, "childTokenUsage": usage(),
                     "cumulativeChildTokenUsage": usage(), "durationMs": 0}, sid)
        self.notify({"type": "error", "message": problem, "errorType": "Error", "timestamp": iso_now(),
                     "error": {"name": "Error", "message": problem}}, sid)
        self.out.send(env_error(turn.request_id, -32603, problem))

    def document_block(self, sess: dict, doc: dict) -> dict:
        """A ``files`` entry as droid stores it; a PDF is also written under
        $HOME/.factory/sessions/<session id>/attachments/ (kept after exit)."""
        if doc["type"] == "text":
            source = {"type": "text", "mediaType": "text/plain", "data": doc["data"]}
            for key in ("name", "mime"):
                if isinstance(doc.get(key), str):
                    source[key] = doc[key]
            return {"type": "document", "source": source}
        source = {"type": "base64", "mediaType": "application/pdf", "data": doc["data"]}
        for key in ("parsedData", "name"):
            if isinstance(doc.get(key), str):
                source[key] = doc[key]
        folder = os.path.join(os.path.expanduser("~"), ".factory", "sessions", sess["id"], "attachments")
        os.makedirs(folder, exist_ok=True)
        name = os.path.basename(str(doc.get("name") or "document.pdf"))
        source["path"] = os.path.join(folder, f"{now_ms()}-{name}")
        with open(source["path"], "wb") as f:
            f.write(lenient_b64decode(doc["data"]))
        return {"type": "document", "source": source}

    def structured_turn(self, turn: Turn, sess: dict, ctx_state: dict) -> None:
        """outputFormat: the "LLM" answers ([[attempts:A||B||C]]: one per attempt; [[json:TEXT]]:
        always TEXT; else a value built from the schema); droid checks each answer against the
        schema and retries twice. A rejected answer streams like any other (deltas, text
        complete) but gets no create_message and no retraction; the accepted one gets a
        create_message with its JSON re-serialized, then ``structured_output``. Three rejections:
        reason structured_output_invalid (recorded: rpc_structured_*)."""
        sid = sess["id"]
        settings = sess["settings"]
        assert turn.schema is not None

        def N(note: dict) -> None:
            self.notify(note, sid)

        attempts = ATTEMPTS_RE.search(turn.text)
        given = JSON_RE.search(turn.text)
        total = usage()
        problem = None
        for attempt in range(STRUCTURED_ATTEMPTS):
            if attempts:
                options = attempts.group(1).split("||")
                text = options[min(attempt, len(options) - 1)]
            elif given:
                text = given.group(1)
            else:
                text = dumps(schema_instance(turn.schema))
            if attempt:
                N({"type": "droid_working_state_changed", "newState": "thinking"})
                self.notify({"type": "session_token_usage_changed", "sessionId": sid,
                             "tokenUsage": add_usage(sess.get("tokenUsage") or usage(), total),
                             "inclusiveTokenUsage": add_usage(sess.get("tokenUsage") or usage(), total),
                             "lastCallTokenUsage": {"inputTokens": total["inputTokens"] // attempt,
                                                    "outputTokens": total["outputTokens"] // attempt,
                                                    "cacheReadTokens": 0}}, None)
            N({"type": "droid_working_state_changed", "newState": "streaming_assistant_message"})
            msg_id = new_id()
            cuts = sorted({0, len(text) // 3, 2 * len(text) // 3, len(text)})
            for start, end in itertools.pairwise(cuts):
                self.pause(turn, DEFAULT_DELAY_S)
                if turn.cancelled:
                    self.finish_cancelled(turn, sess, ctx_state["user_id"], None, "")
                    return
                N({"type": "assistant_text_delta", "messageId": msg_id, "blockIndex": 0, "textDelta": text[start:end]})
            N({"type": "assistant_text_complete", "messageId": msg_id, "blockIndex": 0})
            total = add_usage(total, usage(13 + 2 * attempt, 8))
            value, problem = structured_problem(text, turn.schema)
            if problem is None:
                ts = now_ms()
                msg = {"id": msg_id, "role": "assistant", "content": [{"type": "text", "text": dumps(value)}],
                       "createdAt": ts, "updatedAt": ts, "modelId": settings["modelId"],
                       "reasoningEffort": settings["reasoningEffort"], "openaiMessageId": "chatcmpl-fake1",
                       "parentId": ctx_state["parent"]}
                N({"type": "create_message", "message": msg})
                sess["messages"].append(msg)
                self.notify({"type": "structured_output", "messageId": msg_id, "structuredOutput": value}, None)
                self.complete(turn, sess, "completed", usage(*turn.usage_override) if turn.usage_override else total)
                return
        self.fail_turn(turn, sess, ctx_state, "structured:" + str(problem), total)

    def start_looking(self, turn: Turn, sess: dict, user_id: str) -> str | None:
        """The assistant's "Let me look." before it calls tools; None if the turn was cancelled first."""
        self.notify({"type": "droid_working_state_changed", "newState": "streaming_assistant_message"}, sess["id"])
        msg_a = new_id()
        self.pause(turn, DEFAULT_DELAY_S)
        if turn.cancelled:
            self.finish_cancelled(turn, sess, user_id, None, "")
            return None
        self.notify({"type": "assistant_text_delta", "messageId": msg_a, "blockIndex": 0,
                     "textDelta": "Let me look."}, sess["id"])
        return msg_a

    def permission_turn(self, turn: Turn, sess: dict, ctx_state: dict) -> None:
        sid = sess["id"]
        settings = sess["settings"]
        strict = ctx_state["directives"].get("permission") == "strict"

        def N(note: dict, with_sid: bool = True) -> None:
            self.notify(note, sid if with_sid else None)

        def state(s: str) -> None:
            N({"type": "droid_working_state_changed", "newState": s})

        user_id = ctx_state["user_id"]
        if ctx_state["first"]:
            N({"type": "session_title_updated", "title": "Let me look", "updateType": "llm_generated"})
        msg_a = self.start_looking(turn, sess, user_id)
        if msg_a is None:
            return
        tool_id = "call_exec_" + uuid.uuid4().hex[:8]
        command = f"echo hi > {sess.get('cwd', '.')}/created.txt"
        tool_input = {
            "summary": "Create a small text file",
            "command": command,
            "riskLevelReason": "Writes one small file in the working directory.",
            "riskLevel": "low",
        }
        N({"type": "tool_call", "toolUse": {"type": "tool_use", "id": tool_id, "name": "Execute", "input": {}}}, False)
        N({"type": "assistant_text_complete", "messageId": msg_a, "blockIndex": 0})
        N(
            {"type": "tool_call", "toolUse": {"type": "tool_use", "id": tool_id, "name": "Execute", "input": tool_input}},
            False,
        )
        ts = now_ms()
        msg = {
            "id": msg_a,
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": tool_id, "name": "Execute", "input": tool_input},
            ],
            "createdAt": ts,
            "updatedAt": ts,
            "modelId": settings["modelId"],
            "reasoningEffort": settings["reasoningEffort"],
            "openaiMessageId": "chatcmpl-fake1",
            "parentId": user_id,
        }
        N({"type": "create_message", "message": msg})
        sess["messages"].append(msg)
        self.save(sess)
        state("executing_tool")
        N({"type": "tool_execution_phase_changed", "toolUseId": tool_id, "toolName": "Execute", "phase": "queued"})
        state("waiting_for_tool_confirmation")
        req_id = new_id()
        slot: dict = {"turn": turn, "done": False, "result": None, "error": None}
        with self.lock:
            self.pending_requests[req_id] = slot
        self.out.send(
            env_request(
                "droid.request_permission",
                req_id,
                {
                    "toolUses": [
                        {
                            "toolUse": {"type": "tool_use", "id": tool_id, "name": "Execute", "input": tool_input},
                            "confirmationType": "exec",
                            "details": {
                                "type": "exec",
                                "fullCommand": command,
                                "command": "echo",
                                "extractedCommands": ["echo"],
                                "impactLevel": "low",
                                "riskLevelReason": "Writes one small file in the working directory.",
                            },
                        }
                    ],
                    "options": [
                        {"label": "Yes, allow", "value": "proceed_once", "selectedColor": "#d78700"},
                        {
                            "label": "Yes, and always allow low impact commands (file edits and read-only commands)",
                            "value": "proceed_always",
                            "selectedColor": "#d78700",
                        },
                        {
                            "label": "No, cancel",
                            "value": "cancel",
                            "selectedColor": "#d75f5f",
                            "selectedPrefix": "✕ ",
                        },
                    ],
                },
            )
        )
        first_usage = usage(40, 12)
        self.notify(
            {
                "type": "session_token_usage_changed",
                "sessionId": sid,
                "tokenUsage": add_usage(sess.get("tokenUsage") or usage(), first_usage),
                "inclusiveTokenUsage": add_usage(sess.get("tokenUsage") or usage(), first_usage),
                "lastCallTokenUsage": {"inputTokens": 40, "outputTokens": 12, "cacheReadTokens": 0},
            },
            None,
        )
        self.wait_until(turn, lambda: slot["done"])
        with self.lock:
            self.pending_requests.pop(req_id, None)
        if turn.cancelled and not slot["done"]:
            self.finish_cancelled(turn, sess, msg_a, None, "")
            return
        selected = "cancel"
        if isinstance(slot["result"], dict) and isinstance(slot["result"].get("selectedOption"), str):
            selected = slot["result"]["selectedOption"]
        result_msg_id = new_id()
        if selected == "cancel":
            state("streaming_assistant_message")
            N({"type": "permission_resolved", "requestId": req_id, "toolUseIds": [], "selectedOption": selected}, False)
            content, is_error = "Error: Tool execution cancelled by user", True
        else:
            state("executing_tool")
            N(
                {"type": "permission_resolved", "requestId": req_id, "toolUseIds": [tool_id], "selectedOption": selected},
                False,
            )
            N({"type": "tool_execution_phase_changed", "toolUseId": tool_id, "toolName": "Execute", "phase": "executing"})
            N(
                {
                    "type": "tool_progress_update",
                    "toolUseId": tool_id,
                    "toolName": "Execute",
                    "update": {"type": "status", "text": "", "timestamp": now_ms(), "terminalId": new_id()},
                }
            )
            content, is_error = "Command completed successfully\n\n[Process exited with code 0]", False
        N({"type": "tool_result", "toolUseId": tool_id, "messageId": result_msg_id, "content": content, "isError": is_error})
        ts = now_ms()
        sess["messages"].append(
            {
                "id": result_msg_id,
                "parentId": msg_a,
                "createdAt": ts,
                "updatedAt": ts,
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": tool_id, "is_error": is_error, "content": content}
                ],
            }
        )
        self.save(sess)
        if turn.cancelled:
            self.finish_cancelled(turn, sess, result_msg_id, None, "")
            return
        if selected == "cancel" and strict:
            self.complete(turn, sess, "completed", first_usage)
            return
        if selected != "cancel":
            state("streaming_assistant_message")
        state("thinking")
        ctx2 = dict(ctx_state)
        ctx2["first"] = False
        self.answer(
            turn, sess, ctx2, parent_id=result_msg_id, extra=f" [permission={selected}]", prior_usage=first_usage
        )

    # ---- MCP tools (client tools through droidpool's endpoint)

    def mcp_post(self, server: dict, body: dict) -> dict | None:
        import urllib.request

        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        for header in server.get("headers") or []:
            headers[header["name"]] = header["value"]
        request = urllib.request.Request(server["url"], data=json.dumps(body).encode(), headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            data = response.read()
        return json.loads(data) if data else None

    def mcp_tools(self) -> dict[str, tuple[dict, str]]:
        """droid's names for the MCP servers' tools: <server>___<tool> → (server, tool)."""
        found: dict[str, tuple[dict, str]] = {}
        for server in self.mcp_servers:
            self.mcp_post(server, {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
                "protocolVersion": "2025-11-25", "capabilities": {},
                "clientInfo": {"name": "factory-cli", "version": "0.225.2"}}})
            self.mcp_post(server, {"jsonrpc": "2.0", "method": "notifications/initialized"})
            listed = self.mcp_post(server, {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}) or {}
            for tool in (listed.get("result") or {}).get("tools") or []:
                found[f"{server['name']}___{tool['name']}"] = (server, tool["name"])
        return found

    def client_tools_turn(self, turn: Turn, sess: dict, ctx_state: dict, calls: list[tuple[str, str]]) -> None:
        sid = sess["id"]
        settings = sess["settings"]

        def N(note: dict, with_sid: bool = True) -> None:
            self.notify(note, sid if with_sid else None)

        def state(s: str) -> None:
            N({"type": "droid_working_state_changed", "newState": s})

        tools = self.mcp_tools()
        uses = []
        for index, (name, arguments) in enumerate(calls):
            llm_name = next((t for t in tools if t.endswith("___" + name)), None)
            if llm_name is not None:
                uses.append({"type": "tool_use", "id": f"call_{uuid.uuid4().hex[:12]}", "name": llm_name,
                             "input": json.loads(arguments)})
        if not uses:  # the LLM was not offered the tool: it answers in text
            self.answer(turn, sess, ctx_state, parent_id=ctx_state["user_id"])
            return
        user_id = ctx_state["user_id"]
        msg_a = self.start_looking(turn, sess, user_id)
        if msg_a is None:
            return
        for use in uses:
            N({"type": "tool_call", "toolUse": {**use, "input": {}}}, False)
        N({"type": "assistant_text_complete", "messageId": msg_a, "blockIndex": 0})
        for use in uses:
            N({"type": "tool_call", "toolUse": use}, False)
        ts = now_ms()
        msg = {"id": msg_a, "role": "assistant", "content": [{"type": "text", "text": "Let me look."}, *uses],
               "createdAt": ts, "updatedAt": ts, "modelId": settings["modelId"],
               "reasoningEffort": settings["reasoningEffort"], "openaiMessageId": "chatcmpl-fake1", "parentId": user_id}
        N({"type": "create_message", "message": msg})
        sess["messages"].append(msg)
        self.save(sess)
        state("executing_tool")
        for use in uses:
            N({"type": "tool_execution_phase_changed", "toolUseId": use["id"], "toolName": use["name"], "phase": "queued"})
        state("waiting_for_tool_confirmation")
        req_id = new_id()
        slot: dict = {"turn": turn, "done": False, "result": None, "error": None}
        with self.lock:
            self.pending_requests[req_id] = slot
        server_name = tools[uses[0]["name"]][0]["name"]
        self.out.send(env_request("droid.request_permission", req_id, {
            "toolUses": [{"toolUse": use, "confirmationType": "mcp_tool",
                          "details": {"type": "mcp_tool", "toolName": use["name"], "impactLevel": "high",
                                      "serverName": tools[use["name"]][0]["name"],
                                      "actualToolName": tools[use["name"]][1]}} for use in uses],
            "options": [
                {"label": "Yes, allow", "value": "proceed_once", "selectedColor": "#d78700"},
                {"label": "Yes, and always allow high impact commands (all commands)", "value": "proceed_always",
                 "selectedColor": "#d78700"},
                {"label": f"Always allow {tools[uses[0]['name']][1]}", "value": "proceed_always_tools",
                 "selectedColor": "#d78700"},
                {"label": f"Always allow all \"{server_name}\" tools", "value": "proceed_always_server",
                 "selectedColor": "#d78700"},
                {"label": "No, cancel", "value": "cancel", "selectedColor": "#d75f5f", "selectedPrefix": "✕ "},
            ],
        }))
        first_usage = usage(40, 12)
        self.wait_until(turn, lambda: slot["done"])
        with self.lock:
            self.pending_requests.pop(req_id, None)
        if turn.cancelled and not slot["done"]:  # interrupted while asking: droid resolves it itself
            N({"type": "permission_resolved", "requestId": req_id, "toolUseIds": [], "selectedOption": "cancel"}, False)
            for use in uses:
                N({"type": "tool_result", "toolUseId": use["id"], "messageId": new_id(),
                   "content": "Error: Tool execution cancelled: Batch cancelled", "isError": True})
            self.finish_cancelled(turn, sess, msg_a, None, "")
            return
        selected = "cancel"
        if isinstance(slot["result"], dict) and isinstance(slot["result"].get("selectedOption"), str):
            selected = slot["result"]["selectedOption"]
        if selected == "cancel":
            state("streaming_assistant_message")
            N({"type": "permission_resolved", "requestId": req_id, "toolUseIds": [], "selectedOption": selected}, False)
            for use in uses:
                N({"type": "tool_result", "toolUseId": use["id"], "messageId": new_id(),
                   "content": "Error: Tool execution cancelled by user", "isError": True})
            self.complete(turn, sess, "completed", first_usage)
            return
        state("executing_tool")
        N({"type": "permission_resolved", "requestId": req_id, "toolUseIds": [u["id"] for u in uses],
           "selectedOption": selected}, False)
        results = []
        for use in uses:
            N({"type": "tool_execution_phase_changed", "toolUseId": use["id"], "toolName": use["name"],
               "phase": "executing"})
            server, tool = tools[use["name"]]
            answer = self.mcp_post(server, {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                                            "params": {"name": tool, "arguments": use["input"]}}) or {}
            result = answer.get("result") or {}
            items = [c for c in result.get("content") or [] if isinstance(c, dict)]
            text = "".join(c.get("text", "") for c in items)
            is_error = bool(result.get("isError"))
            content: str | list = f"Error: Error: {text}" if is_error else text
            seen = text
            images = [c for c in items if c.get("type") == "image"]
            if images and not is_error:
                # droid keeps the blocks; the LLM gets the text in the tool message and the images
                # in a user message after it, or a note when the model takes no images
                # (recorded: rpc_attach_tool_image*.stdout.jsonl)
                content = [{"type": "image", "source": {"type": "base64", "mediaType": c.get("mimeType"),
                                                        "data": c.get("data")}} if c.get("type") == "image"
                           else {"type": "text", "text": c.get("text", "")} for c in items]
                if supports_images(settings["modelId"]):
                    seen = "\n".join(c.get("text", "") for c in items if c.get("type") != "image")
                    seen += f" [+{len(images)} image(s)]"
                else:
                    seen = "\n".join(IMAGE_NOT_SHOWN if c.get("type") == "image" else c.get("text", "") for c in items)
            results.append(f"Error: MCP tool {use['name']} returned an error: {text}" if is_error else seen)
            result_id = new_id()
            N({"type": "tool_result", "toolUseId": use["id"], "messageId": result_id, "content": content,
               "isError": is_error})
            ts = now_ms()
            sess["messages"].append({"id": result_id, "parentId": msg_a, "createdAt": ts, "updatedAt": ts,
                                     "role": "user", "content": [{"type": "tool_result", "tool_use_id": use["id"],
                                                                  "is_error": is_error, "content": content}]})
        self.save(sess)
        if turn.cancelled:
            self.finish_cancelled(turn, sess, msg_a, None, "")
            return
        state("streaming_assistant_message")
        text = "Tool said: " + " | ".join(results)
        msg_b = new_id()
        N({"type": "assistant_text_delta", "messageId": msg_b, "blockIndex": 0, "textDelta": text})
        N({"type": "assistant_text_complete", "messageId": msg_b, "blockIndex": 0})
        ts = now_ms()
        final = {"id": msg_b, "role": "assistant", "content": [{"type": "text", "text": text}], "createdAt": ts,
                 "updatedAt": ts, "modelId": settings["modelId"], "reasoningEffort": settings["reasoningEffort"],
                 "parentId": msg_a}
        N({"type": "create_message", "message": final})
        sess["messages"].append(final)
        self.complete(turn, sess, "completed", add_usage(first_usage, usage(60, len(text.split()))))

    def finish_cancelled(self, turn: Turn, sess: dict, parent_id: str, partial_id: str | None, partial: str) -> None:
        settings = sess["settings"]
        if partial_id and partial:
            ts = now_ms()
            sess["messages"].append(
                {
                    "id": partial_id,
                    "parentId": parent_id,
                    "createdAt": ts,
                    "updatedAt": ts,
                    "role": "assistant",
                    "content": [{"type": "text", "text": partial}],
                    "openaiMessageId": "chatcmpl-fake1",
                    "modelId": settings["modelId"],
                    "reasoningEffort": settings["reasoningEffort"],
                }
            )
            parent_id = partial_id
        for text in ("Request cancelled by user", "Request interrupted by user"):
            ts = now_ms()
            m = {
                "id": new_id(),
                "role": "system",
                "content": [{"type": "text", "text": text}],
                "visibility": "llm_only",
                "createdAt": ts,
                "updatedAt": ts,
                "parentId": parent_id,
            }
            self.notify({"type": "create_message", "message": m}, sess["id"])
            sess["messages"].append(m)
            parent_id = m["id"]
        # droid reports what the LLM calls before the interrupt used (recorded: 13 in, 5 out)
        self.complete(turn, sess, "cancelled", usage(*turn.usage_override) if turn.usage_override else usage())

    def complete(self, turn: Turn, sess: dict, reason: str, turn_usage: dict) -> None:
        sid = sess["id"]
        if reason == "completed" and self.exit_after:
            reason = "process_exit"
        turn_id = turn.user_id
        with self.lock:
            total = add_usage(sess.get("tokenUsage") or usage(), turn_usage)
            sess["tokenUsage"] = total
            if turn_usage["inputTokens"] or turn_usage["outputTokens"]:
                sess["lastCallTokenUsage"] = {
                    "inputTokens": turn_usage["inputTokens"],
                    "outputTokens": turn_usage["outputTokens"],
                    "cacheReadTokens": 0,
                }
            self.save(sess)
        if turn_usage["inputTokens"] or turn_usage["outputTokens"]:
            self.notify(
                {
                    "type": "session_token_usage_changed",
                    "sessionId": sid,
                    "tokenUsage": total,
                    "inclusiveTokenUsage": total,
                    "lastCallTokenUsage": sess["lastCallTokenUsage"],
                },
                None,
            )
        self.notify(
            {
                "type": "agent_turn_completed",
                "reason": reason,
                "turnId": turn_id,
                "tokenUsage": turn_usage,
                "cumulativeTokenUsage": total,
                "childTokenUsage": usage(),
                "cumulativeChildTokenUsage": usage(),
                "durationMs": int((time.monotonic() - turn.started) * 1000),
            },
            sid,
        )
        self.notify({"type": "droid_working_state_changed", "newState": "idle"}, sid)


METHODS = {
    "droid.initialize_session": Server.m_initialize_session,
    "droid.load_session": Server.m_load_session,
    "droid.add_user_message": Server.m_add_user_message,
    "droid.interrupt_session": Server.m_interrupt_session,
    "droid.update_session_settings": Server.m_update_session_settings,
    "droid.list_models": Server.m_list_models,
    "droid.list_tools": Server.m_list_tools,
    "droid.get_context_stats": Server.m_get_context_stats,
    "droid.close_session": Server.m_close_session,
    "droid.rename_session": Server.m_rename_session,
}


# --------------------------------------------------------------------------------------
# process entry


def spawn_child() -> None:
    mode = os.environ.get("FAKE_DROID_SPAWN_CHILD", "")
    if not mode or mode == "0":
        return
    actions = []
    if mode != "inherit":
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
            (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
        ]
    else:
        actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)]
    pid = os.posix_spawnp("sleep", ["sleep", "300"], dict(os.environ), file_actions=actions)
    pidfile = os.environ.get("FAKE_DROID_CHILD_PIDFILE")
    if pidfile:
        with open(pidfile, "w", encoding="utf-8") as f:
            f.write(f"{pid}\n")


def parse_exec_args(args: list[str]) -> dict[str, str]:
    opts: dict[str, str] = {}
    aliases = {"-o": "--output-format", "-m": "--model", "-r": "--reasoning-effort", "-f": "--file"}
    takes_value = {
        "--input-format",
        "--output-format",
        "--cwd",
        "--model",
        "--reasoning-effort",
        "--auto",
        "--settings",
        "--file",
        "--session-id",
        "-s",
        "--fork",
        "--only-tools",
        "--add-tools",
        "--remove-tools",
        "--append-system-prompt",
        "--append-system-prompt-file",
    }
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--") and "=" in a:
            k, v = a.split("=", 1)
            opts[aliases.get(k, k)] = v
        elif a in takes_value or a in aliases:
            k = aliases.get(a, a)
            if i + 1 < len(args):
                opts[k] = args[i + 1]
                i += 1
        i += 1
    return opts


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("--version", "-v", "-V"):
        sys.stdout.write(VERSION + "\n")
        sys.stdout.flush()
        return 0
    if not argv or argv[0] != "exec":
        sys.stderr.write("fake_droid: only `--version` and `exec` are supported\n")
        return 1
    opts = parse_exec_args(argv[1:])
    if opts.get("--input-format") != "stream-jsonrpc" or opts.get("--output-format") != "stream-jsonrpc":
        sys.stderr.write(
            "fake_droid: only `exec --input-format stream-jsonrpc --output-format stream-jsonrpc` is supported\n"
        )
        return 1
    if os.environ.get("FAKE_DROID_FAIL_START", "") not in ("", "0"):
        sys.stderr.write("Error: fake droid failed to start (FAKE_DROID_FAIL_START)\n")
        sys.stderr.flush()
        return 1
    cwd = opts.get("--cwd")
    if cwd:
        try:
            os.chdir(cwd)
        except OSError:
            sys.stderr.write(f"Error changing to directory: {cwd}\n")
            return 1

    server = Server()
    if os.environ.get("FAKE_DROID_IGNORE_SIGTERM", "") not in ("", "0"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, server.on_signal)
    signal.signal(signal.SIGINT, server.on_signal)

    spawn_child()

    delay_ms = os.environ.get("FAKE_DROID_START_DELAY_MS", "")
    if delay_ms:
        try:
            time.sleep(max(0.0, float(delay_ms)) / 1000.0)
        except ValueError:
            pass
    server.out.send(
        env_notification(
            {
                "type": "mcp_status_changed",
                "servers": [],
                "summary": {"total": 0, "connected": 0, "connecting": 0, "failed": 0, "disabled": 0},
            },
            None,
        )
    )
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
