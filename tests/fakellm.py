"""A scripted fake LLM: the OpenAI chat-completions API, streamed, on loopback.

droid's BYOK custom models point their ``baseUrl`` at this server. The path selects the
scenario (``/s/<scenario>/v1/chat/completions``; plain ``/v1/...`` is ``paced``), so one
server serves every model the tests define. Every request body is recorded and can be
read back with ``GET /_requests`` (and cleared with ``DELETE /_requests``): this is how
tests prove what context droid sent upstream.

Scenarios:
    paced      8 distinct words, PACE_S apart (the default)
    echo       one chunk: "ECHO n_msgs=N roles=… last_user=<JSON of the last user message's text parts>"
    reasoning  3 reasoning_content chunks, then 3 words
    err401     HTTP 401 JSON error
    hang       never answers (title requests are answered)
    hang_mid   one chunk, then nothing
    tools      ``[[call:NAME:{json}]]`` directives in the last user text become tool calls of the
               offered tool NAME (or <server>___NAME), after "Let me look."; once the results are
               back (the ``tool`` messages after the last assistant one): "Tool said: " + the
               results joined by " | ". droid sends a tool result's images as a user message
               after the tool messages ("Image content from tool result:" + image_url parts): such
               a message adds " [+N image(s)]" to the result it follows. Else "No tool needed."
    json       structured output (droid's outputFormat: it adds the JSON Schema to the system
               prompt and retries an answer that fails it, adding a system message "Your previous
               final response did not satisfy the requested structured output contract. …").
               The answer, in 3 chunks: ``[[attempts:A||B||C]]`` in the last user text picks the
               answer by how many of droid's retry messages the request holds (A first, then B,
               C; the last repeats); else ``[[json:TEXT]]`` answers TEXT every time (both
               directives run to the last "]]" of the text); else a small value built from the
               schema in the system prompt ("sample", 1, 1.5, true, first enum value, every
               property); else {"ok":true}.

A user message with ``[[cached:N]]`` (paced scenario) reports N more prompt tokens, all of them
cache hits (``usage.prompt_tokens_details.cached_tokens``).

Each recorded request (``GET /_requests``) has ``scenario``, ``title`` (droid's title request,
max_tokens 32), ``messages`` (in full), ``tools`` (names), ``response_format`` (droid 0.225.2 never
sends one) and ``body`` (every other key droid sent: model, stream, stream_options, max_tokens,
temperature, tool_choice, a model's extraArgs...).

Run as ``python -m tests.fakellm --port 0``; it prints ``PORT <n>`` once listening.
Answers avoid repeated text: droid aborts turns whose output cycles.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import re
import time
from typing import Any

import orjson
from aiohttp import web

WORDS = (
    "amber basalt cobalt dune ember fjord granite harbor indigo juniper kelp lagoon meadow "
    "nimbus obsidian prairie quartz river sierra tundra umber valley willow xenon yarrow zephyr"
).split()

# Seconds between content chunks of the paced scenario; the e2e tests compare the
# arrival spacing at the client against this.
PACE_S = 0.12
PACED_CHUNKS = 8


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(
                    part.get("text", "") for part in content if isinstance(part, dict)
                )
    return ""


CALL_RE = re.compile(r"\[\[call:([A-Za-z0-9_.-]+):(\{.*?\})\]\]")


# droid 0.225.2 sends the images of a tool result as a user message after the tool messages
TOOL_IMAGE_MARK = "Image content from tool result:"


def _tool_results(messages: list[dict[str, Any]]) -> list[str]:
    """The tool messages after the last assistant one (the results the LLM is to use); the
    user messages droid adds after them with the results' images count as " [+N image(s)]"."""
    out: list[str] = []
    images = 0
    for message in reversed(messages):
        content = message.get("content")
        if message.get("role") == "user" and not out and isinstance(content, list) \
                and any(isinstance(p, dict) and p.get("text") == TOOL_IMAGE_MARK for p in content):
            images += sum(1 for p in content if isinstance(p, dict) and p.get("type") == "image_url")
            continue
        if message.get("role") != "tool":
            break
        out.append(content if isinstance(content, str) else orjson.dumps(content).decode())
    if out and images:
        out[0] += f" [+{images} image(s)]"
    return out[::-1]


def _planned_calls(messages: list[dict[str, Any]], tools: list[str]) -> list[tuple[str, str]]:
    """``[[call:NAME:ARGS]]`` directives in the last user text, as (tool name offered, arguments)."""
    calls = []
    for name, arguments in CALL_RE.findall(_last_user_text(messages)):
        offered = next((t for t in tools if t == name or t.endswith("___" + name)), None)
        if offered is not None:
            calls.append((offered, arguments))
    return calls


# droid's retry message after an answer that failed the outputFormat schema (droid 0.225.2)
STRUCTURED_RETRY_MARK = "did not satisfy the requested structured output contract"
ATTEMPTS_RE = re.compile(r"\[\[attempts:(.*)\]\]", re.DOTALL)
JSON_RE = re.compile(r"\[\[json:(.*)\]\]", re.DOTALL)
SCHEMA_MARK = "matching this JSON Schema:"


def _text_of(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def _structured_retries(messages: list[dict[str, Any]]) -> int:
    """How many times droid already asked for a retry of a structured answer."""
    return sum(1 for m in messages if STRUCTURED_RETRY_MARK in _text_of(m))


def _schema_in_system(messages: list[dict[str, Any]]) -> Any:
    """The JSON Schema droid put at the end of the system prompt for outputFormat, if any."""
    for message in messages:
        text = _text_of(message) if message.get("role") == "system" else ""
        start = text.find("{", text.find(SCHEMA_MARK)) if SCHEMA_MARK in text else -1
        if start >= 0:
            try:
                return json.JSONDecoder().raw_decode(text, start)[0]
            except ValueError:
                return None
    return None


def _instance(schema: Any, depth: int = 0) -> Any:
    """A small value that satisfies a simple JSON Schema (types, properties, enum, const)."""
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
        return {name: _instance(sub, depth + 1) for name, sub in props.items()}
    if kind == "array":
        return [_instance(schema.get("items"), depth + 1)] if isinstance(schema.get("items"), dict) else []
    if kind == "string":
        return "sample"
    if kind == "integer":
        return 1
    if kind == "number":
        return 1.5
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return {}


def _structured_answer(messages: list[dict[str, Any]]) -> str:
    """The ``json`` scenario's answer text (see the module docstring)."""
    user_text = _last_user_text(messages)
    attempts = ATTEMPTS_RE.search(user_text)
    if attempts:
        options = attempts[1].split("||")
        return options[min(_structured_retries(messages), len(options) - 1)]
    given = JSON_RE.search(user_text)
    if given:
        return given[1]
    schema = _schema_in_system(messages)
    return orjson.dumps(_instance(schema) if schema is not None else {"ok": True}).decode()


def _words(seed: str, count: int) -> list[str]:
    """Distinct-looking words derived from the seed, so no two answers repeat."""
    digest = hashlib.sha256(seed.encode()).digest()
    return [f"{WORDS[digest[i % 32] % len(WORDS)]}{i}" for i in range(count)]


def _chunk(model: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
    body = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(body) + b"\n\n"


def _usage_chunk(model: str, prompt: int, completion: int, cached: int = 0) -> bytes:
    details = {"prompt_tokens_details": {"cached_tokens": cached}} if cached else {}
    body = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            **details,
        },
    }
    return b"data: " + orjson.dumps(body) + b"\n\n"


class FakeLLM:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        self.app.router.add_post("/v1/chat/completions", self.chat)
        self.app.router.add_post("/s/{scenario}/v1/chat/completions", self.chat)
        self.app.router.add_get("/_requests", self.list_requests)
        self.app.router.add_delete("/_requests", self.clear_requests)

    async def list_requests(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.requests), content_type="application/json")

    async def clear_requests(self, request: web.Request) -> web.Response:
        self.requests.clear()
        return web.Response(status=204)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        scenario = request.match_info.get("scenario", "paced")
        body = await request.json(loads=orjson.loads)
        messages = body.get("messages", [])
        is_title = body.get("max_tokens") == 32
        self.requests.append(
            {
                "t": time.time(),
                "scenario": scenario,
                "title": is_title,
                "messages": messages,
                "tools": [t.get("function", {}).get("name") for t in body.get("tools", [])],
                "response_format": body.get("response_format"),
                # everything else droid sent (model, max_tokens, stream, tool_choice, extraArgs...)
                "body": {k: v for k, v in body.items() if k not in ("messages", "tools")},
            }
        )
        model = str(body.get("model", "fake"))
        if scenario == "err401":
            return web.json_response(
                {"error": {"message": "Invalid API key (fake)", "type": "auth"}}, status=401
            )
        if scenario == "hang" and not is_title:
            await asyncio.sleep(3600)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        user_text = _last_user_text(messages)
        if is_title:
            await response.write(_chunk(model, {"role": "assistant", "content": "Chat title"}))
        elif scenario == "reasoning":
            for piece in ("Weighing ", "the ", "question."):
                await response.write(_chunk(model, {"reasoning_content": piece}))
                await asyncio.sleep(0.02)
            for piece in _words(user_text + str(len(messages)), 3):
                await response.write(_chunk(model, {"content": piece + " "}))
        elif scenario == "echo":
            roles = ",".join(str(m.get("role")) for m in messages)
            text = f"ECHO n_msgs={len(messages)} roles={roles} last_user={orjson.dumps(user_text).decode()}"
            await response.write(_chunk(model, {"role": "assistant", "content": text}))
        elif scenario == "tools":
            results = _tool_results(messages)
            calls = [] if results else _planned_calls(messages, self.requests[-1]["tools"])
            if results:
                await response.write(_chunk(model, {"role": "assistant", "content": "Tool said: " + " | ".join(results)}))
            elif calls:
                await response.write(_chunk(model, {"role": "assistant", "content": "Let me look."}))
                for index, (name, arguments) in enumerate(calls):
                    call_id = "call_" + hashlib.sha256(f"{len(messages)}{index}{arguments}".encode()).hexdigest()[:12]
                    await response.write(_chunk(model, {"tool_calls": [{"index": index, "id": call_id, "type": "function",
                                                                        "function": {"name": name, "arguments": ""}}]}))
                    await response.write(_chunk(model, {"tool_calls": [{"index": index,
                                                                        "function": {"arguments": arguments}}]}))
                await response.write(_chunk(model, {}, finish="tool_calls"))
                await response.write(_usage_chunk(model, 10 + len(messages), 5))
                await response.write(b"data: [DONE]\n\n")
                await response.write_eof()
                return response
            else:
                await response.write(_chunk(model, {"role": "assistant", "content": "No tool needed."}))
        elif scenario == "json":
            text = _structured_answer(messages)
            cuts = sorted({0, len(text) // 3, 2 * len(text) // 3, len(text)})
            for start, end in itertools.pairwise(cuts):
                await response.write(_chunk(model, {"content": text[start:end]}))
        elif scenario == "hang_mid":
            await response.write(_chunk(model, {"content": "partial "}))
            await asyncio.sleep(3600)
        else:  # paced
            for word in _words(user_text + str(len(messages)), PACED_CHUNKS):
                await response.write(_chunk(model, {"content": word + " "}))
                await asyncio.sleep(PACE_S)
        await response.write(_chunk(model, {}, finish="stop"))
        cached = re.search(r"\[\[cached:(\d+)\]\]", user_text)  # report a prompt cache hit of N tokens
        prompt = 10 + len(messages) + (int(cached[1]) if cached else 0)
        await response.write(_usage_chunk(model, prompt, PACED_CHUNKS, int(cached[1]) if cached else 0))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


async def _serve(host: str, port: int) -> None:
    runner = web.AppRunner(FakeLLM().app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server
    assert server is not None and server.sockets  # type: ignore[union-attr]
    bound = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"PORT {bound}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        asyncio.run(_serve(args.host, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
