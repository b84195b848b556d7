"""After a client tool result, the resumed turn's time to first token, next to a plain follow-up
turn's, side by side in one run.

Run from the repository root::

    python -m tests.benchmarks.bench_tools [--rounds N]

One droidpool runs the real droid CLI against the scripted fake LLM (``custom:fake-tools``,
which calls a tool when asked and answers at once), so what is measured is droidpool's and
droid's own latency. Each round, in Chat Completions with the same tool offered, streamed and
by stateless resend of the whole history:

- ``follow-up``: a conversation's second turn, a plain user message;
- ``resumed``: the request that brings the result of the tool the first turn called. The parked
  droid turn carries on: droid calls the tool over MCP (droidpool serves the result) and asks
  the LLM again, with no history re-sent.

Both are timed from just before the request is sent to the first piece of answer text. The
order alternates from round to round, and no droid is starting while a turn is timed.
Target: the resumed median within 30 ms of the follow-up one. Every process started here is
stopped on the way out.
"""

from __future__ import annotations

import asyncio
import statistics
from typing import Any

import aiohttp

from tests.benchmarks.bench_dialects import (
    chat_text,
    real_droid_daemon,
    rounds,
    rounds_argument,
    settle,
    stream,
)
from tests.benchmarks.bench_resume import summary

MODEL = "custom:fake-tools"
TARGET_MS = 30.0
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


async def calls(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """A non-streamed turn that must end in tool calls: its assistant message."""
    async with asyncio.timeout(60), http.post(url, json=body) as response:
        data = await response.json()
    choice = data["choices"][0]
    if choice["finish_reason"] != "tool_calls":
        raise RuntimeError(f"expected tool calls, got {data}")
    return dict(choice["message"])


async def follow_up(http: aiohttp.ClientSession, base: str, tag: str) -> float:
    url = f"{base}/v1/chat/completions"
    messages: list[dict[str, Any]] = [{"role": "user", "content": f"first {tag}"}]
    _, answer, _ = await stream(http, url, {"model": MODEL, "messages": messages, "tools": [TOOL], "stream": True},
                                chat_text)
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": f"second {tag}"}]
    await settle(http, base)
    ms, text, _ = await stream(http, url, {"model": MODEL, "messages": messages, "tools": [TOOL], "stream": True},
                               chat_text)
    if text != "No tool needed.":
        raise RuntimeError(f"unexpected follow-up answer {text!r}")
    return ms


async def resumed(http: aiohttp.ClientSession, base: str, tag: str) -> float:
    url = f"{base}/v1/chat/completions"
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": f"first {tag} [[call:get_weather:{{\"city\": \"Paris\"}}]]"}]
    message = await calls(http, url, {"model": MODEL, "messages": messages, "tools": [TOOL]})
    messages += [message, {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": f"Sunny {tag}"}]
    await settle(http, base)
    ms, text, _ = await stream(http, url, {"model": MODEL, "messages": messages, "tools": [TOOL], "stream": True},
                               chat_text)
    if text != f"Tool said: Sunny {tag}":
        raise RuntimeError(f"unexpected resumed answer {text!r}")
    return ms


def main() -> None:
    count = rounds_argument(__doc__)
    with real_droid_daemon("tools", MODEL) as (daemon, binary):
        print(f"droidpool + droid {binary}, model {MODEL}, {count} rounds", flush=True)
        samples = asyncio.run(rounds(daemon, count, {"follow-up": follow_up, "resumed": resumed}))
        print()
        print("Time to first token:")
        for name, values in samples.items():
            print(summary(name, values))
        gap = statistics.median(samples["resumed"]) - statistics.median(samples["follow-up"])
        verdict = "within" if gap <= TARGET_MS else "OVER"
        print(f"resumed - follow-up (medians): {gap:+.1f} ms: {verdict} the {TARGET_MS:g} ms target")


if __name__ == "__main__":
    main()
