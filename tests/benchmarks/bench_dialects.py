"""Follow-up time to first token in each wire dialect, side by side in one run.

Run from the repository root::

    python -m tests.benchmarks.bench_dialects [--rounds N]

One droidpool runs the real droid CLI against the scripted fake LLM (``custom:fake-echo``,
which answers at once), so what is measured is droidpool's and droid's own latency. Each
round starts one conversation per dialect and times its second turn, streamed, from just
before the request is sent to the first piece of answer text:

- ``chat``: Chat Completions, the second turn by stateless resend of the whole history;
- ``anthropic``: Anthropic Messages, the second turn by stateless resend;
- ``responses``: OpenAI Responses, the second turn by ``previous_response_id`` (only the new input).

The order of the dialects rotates from round to round, and no droid is starting while a turn
is timed. Target: the Anthropic and Responses medians within 15 ms of the Chat Completions one.
Every process started here is stopped on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp

from tests.benchmarks.bench_resume import summary
from tests.conftest import Daemon, FakeLLMProcess, real_droid_path, start_daemon, write_droid_home

MODEL = "custom:fake-echo"
TARGET_MS = 15.0
REQUEST_TIMEOUT_S = 60.0


async def stream(http: aiohttp.ClientSession, url: str, body: dict[str, Any], pick: Callable[[dict[str, Any]], str]
                 ) -> tuple[float, str, dict[str, Any]]:
    """POST a streaming request: (ms to the first text, the whole text, the last event)."""
    started = time.perf_counter()
    first: float | None = None
    text: list[str] = []
    last: dict[str, Any] = {}
    async with asyncio.timeout(REQUEST_TIMEOUT_S):
        async with http.post(url, json=body, headers={"anthropic-version": "2023-06-01"}) as response:
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {await response.text()}")
            async for line in response.content:
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event and event.get("type") in (None, "error"):
                    raise RuntimeError(f"in-band error: {event['error']}")
                last = event
                piece = pick(event)
                if piece:
                    first = first or time.perf_counter()
                    text.append(piece)
    if first is None:
        raise RuntimeError(f"no text from {url}")
    return (first - started) * 1000, "".join(text), last


async def settle(http: aiohttp.ClientSession, base: str, timeout: float = 30.0) -> None:
    """Wait until no droid is starting: a spawn would compete for the CPU with the timed turn."""
    async with asyncio.timeout(timeout):
        while True:
            async with http.get(f"{base}/readyz") as response:
                if (await response.json())["workers"].get("starting", 0) == 0:
                    return
            await asyncio.sleep(0.05)


def chat_text(event: dict[str, Any]) -> str:
    return str(event["choices"][0]["delta"].get("content") or "") if event.get("choices") else ""


def anthropic_text(event: dict[str, Any]) -> str:
    delta = event.get("delta") if event.get("type") == "content_block_delta" else None
    return str(delta.get("text", "")) if isinstance(delta, dict) else ""


def responses_text(event: dict[str, Any]) -> str:
    return str(event.get("delta", "")) if event.get("type") == "response.output_text.delta" else ""


async def chat(http: aiohttp.ClientSession, base: str, tag: str) -> float:
    url = f"{base}/v1/chat/completions"
    messages: list[dict[str, Any]] = [{"role": "user", "content": f"first {tag}"}]
    _, answer, _ = await stream(http, url, {"model": MODEL, "messages": messages, "stream": True}, chat_text)
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": f"second {tag}"}]
    await settle(http, base)
    ms, _, _ = await stream(http, url, {"model": MODEL, "messages": messages, "stream": True}, chat_text)
    return ms


async def anthropic(http: aiohttp.ClientSession, base: str, tag: str) -> float:
    url = f"{base}/v1/messages"
    messages: list[dict[str, Any]] = [{"role": "user", "content": f"first {tag}"}]
    body = {"model": MODEL, "max_tokens": 1024, "stream": True}
    _, answer, _ = await stream(http, url, {**body, "messages": messages}, anthropic_text)
    messages += [{"role": "assistant", "content": [{"type": "text", "text": answer}]},
                 {"role": "user", "content": f"second {tag}"}]
    await settle(http, base)
    ms, _, _ = await stream(http, url, {**body, "messages": messages}, anthropic_text)
    return ms


async def responses(http: aiohttp.ClientSession, base: str, tag: str) -> float:
    url = f"{base}/v1/responses"
    _, _, last = await stream(http, url, {"model": MODEL, "input": f"first {tag}", "stream": True}, responses_text)
    previous = last["response"]["id"]
    await settle(http, base)
    ms, _, _ = await stream(http, url, {"model": MODEL, "input": f"second {tag}", "stream": True,
                                        "previous_response_id": previous}, responses_text)
    return ms


DIALECTS: dict[str, Callable[[aiohttp.ClientSession, str, str], Awaitable[float]]] = {
    "chat": chat, "anthropic": anthropic, "responses": responses,
}
Kind = Callable[[aiohttp.ClientSession, str, str], Awaitable[float]]


async def rounds(daemon: Daemon, count: int, kinds: dict[str, Kind]) -> dict[str, list[float]]:
    """``count`` rounds, each timing every kind once, their order rotating from round to round;
    no droid is starting while one is timed."""
    samples: dict[str, list[float]] = {name: [] for name in kinds}
    names = list(kinds)
    async with aiohttp.ClientSession() as http:
        for index in range(count):
            order = names[index % len(names):] + names[:index % len(names)]
            run = uuid.uuid4().hex[:6]
            for name in order:
                await settle(http, daemon.base_url)
                samples[name].append(await kinds[name](http, daemon.base_url, f"{name}-{run}"))
            print(f"round {index + 1}/{count}: " + ", ".join(f"{n} {samples[n][-1]:.1f} ms" for n in names),
                  flush=True)
    return samples


def rounds_argument(doc: str | None) -> int:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    return int(parser.parse_args().rounds)


@contextmanager
def real_droid_daemon(name: str, model: str) -> Iterator[tuple[Daemon, str]]:
    """One droidpool on the real droid and the fake LLM (``model`` offered), stopped on the way out."""
    binary = real_droid_path()
    if binary is None:
        raise SystemExit("the real droid CLI is needed (set DROIDPOOL_TEST_DROID)")
    tmp = Path(tempfile.mkdtemp(prefix=f"droidpool-bench-{name}-"))
    llm = FakeLLMProcess()
    daemon: Daemon | None = None
    try:
        home = write_droid_home(tmp / "home", llm.url)
        daemon = start_daemon(tmp, {
            "server": {"log_level": "info"},
            "droid": {"binary": binary, "home": str(home), "airgap": True},
            "pool": {"max_workers": 6, "models": [{"id": model}], "idle_min": 1},
        }, ready_timeout=60)
        yield daemon, binary
    finally:
        if daemon is not None:
            daemon.stop()
        llm.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    count = rounds_argument(__doc__)
    with real_droid_daemon("dialects", MODEL) as (daemon, binary):
        print(f"droidpool + droid {binary}, model {MODEL}, {count} rounds", flush=True)
        samples = asyncio.run(rounds(daemon, count, DIALECTS))
        print()
        print("Follow-up turn, time to first token:")
        for name, values in samples.items():
            print(summary(name, values))
        base = statistics.median(samples["chat"])
        for name in ("anthropic", "responses"):
            gap = statistics.median(samples[name]) - base
            verdict = "within" if abs(gap) <= TARGET_MS else "OVER"
            print(f"{name} - chat (medians): {gap:+.1f} ms: {verdict} the {TARGET_MS:g} ms target")


if __name__ == "__main__":
    main()
