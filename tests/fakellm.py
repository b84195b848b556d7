"""A scripted fake LLM: the OpenAI chat-completions API, streamed, on loopback.

droid's BYOK custom models point their ``baseUrl`` at this server. The path selects the
scenario (``/s/<scenario>/v1/chat/completions``; plain ``/v1/...`` is ``paced``), so one
server serves every model the tests define. Every request body is recorded and can be
read back with ``GET /_requests`` (and cleared with ``DELETE /_requests``): this is how
tests prove what context droid sent upstream.

A user message with ``[[cached:N]]`` (paced scenario) reports N more prompt tokens, all of them
cache hits (``usage.prompt_tokens_details.cached_tokens``).

Run as ``python -m tests.fakellm --port 0``; it prints ``PORT <n>`` once listening.
Answers avoid repeated text: droid aborts turns whose output cycles.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
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


def _tool_results(messages: list[dict[str, Any]]) -> list[str]:
    """The tool messages after the last assistant one (the results the LLM is to use)."""
    out: list[str] = []
    for message in reversed(messages):
        if message.get("role") != "tool":
            break
        content = message.get("content")
        out.append(content if isinstance(content, str) else orjson.dumps(content).decode())
    return out[::-1]


def _planned_calls(messages: list[dict[str, Any]], tools: list[str]) -> list[tuple[str, str]]:
    """``[[call:NAME:ARGS]]`` directives in the last user text, as (tool name offered, arguments)."""
    calls = []
    for name, arguments in CALL_RE.findall(_last_user_text(messages)):
        offered = next((t for t in tools if t == name or t.endswith("___" + name)), None)
        if offered is not None:
            calls.append((offered, arguments))
    return calls


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
