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

import argparse
import asyncio
import shutil
import statistics
import tempfile
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from tests.benchmarks.bench_dialects import chat_text, settle, stream
from tests.benchmarks.bench_resume import summary
from tests.conftest import Daemon, FakeLLMProcess, real_droid_path, start_daemon, write_droid_home

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


async def rounds(daemon: Daemon, count: int) -> dict[str, list[float]]:
    kinds = {"follow-up": follow_up, "resumed": resumed}
    samples: dict[str, list[float]] = {name: [] for name in kinds}
    async with aiohttp.ClientSession() as http:
        for index in range(count):
            order = list(kinds) if index % 2 == 0 else list(kinds)[::-1]
            run = uuid.uuid4().hex[:6]
            for name in order:
                await settle(http, daemon.base_url)
                samples[name].append(await kinds[name](http, daemon.base_url, f"{name}-{run}"))
            print(f"round {index + 1}/{count}: " + ", ".join(f"{n} {samples[n][-1]:.1f} ms" for n in kinds),
                  flush=True)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    binary = real_droid_path()
    if binary is None:
        raise SystemExit("the real droid CLI is needed (set DROIDPOOL_TEST_DROID)")
    tmp = Path(tempfile.mkdtemp(prefix="droidpool-bench-tools-"))
    llm = FakeLLMProcess()
    daemon: Daemon | None = None
    try:
        home = write_droid_home(tmp / "home", llm.url)
        daemon = start_daemon(tmp, {
            "server": {"log_level": "info"},
            "droid": {"binary": binary, "home": str(home), "airgap": True},
            "pool": {"max_workers": 6, "models": [{"id": MODEL}], "idle_min": 1},
        }, ready_timeout=60)
        print(f"droidpool + droid {binary}, model {MODEL}, {args.rounds} rounds", flush=True)
        samples = asyncio.run(rounds(daemon, args.rounds))
        print()
        print("Time to first token:")
        for name, values in samples.items():
            print(summary(name, values))
        gap = statistics.median(samples["resumed"]) - statistics.median(samples["follow-up"])
        verdict = "within" if gap <= TARGET_MS else "OVER"
        print(f"resumed - follow-up (medians): {gap:+.1f} ms: {verdict} the {TARGET_MS:g} ms target")
    finally:
        if daemon is not None:
            daemon.stop()
        llm.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
