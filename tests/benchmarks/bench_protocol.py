"""What parsing droid's stream costs per event: droidpool's protocol layer next to Factory's
``droid-sdk``, side by side in one run.

Run from the repository root::

    python -m tests.benchmarks.bench_protocol [--events N] [--repeats N]

The stream is ``--events`` ``assistant_text_delta`` notifications, each the shape of a real line
droid 0.225.2 wrote (``tests/fixtures/rpc_client_tools_single.stdout.jsonl``) with its
``textDelta`` varied (words, spaces, newlines, quotes, non-ASCII), then one
``agent_turn_completed``. Every path must turn them into the same text.

1. ``parse``: one stdout line (bytes, newline stripped) to a typed event, framing excluded:

   - ``droidpool``: ``parse_line`` + ``turn_event`` (orjson, then plain dict look-ups);
   - ``sdk low-level``: what ``DroidClient.receive_response`` does per line: the transport's
     decode + ``json.loads``, ``ProtocolEngine._handle_message``, the client's dispatch, then
     ``SessionNotification.model_validate`` (pydantic) + ``_notification_to_stream_message``;
   - ``sdk Session.stream``: the same up to the dispatch, then ``RunStream.feed_notification``
     (pydantic validation, conversion, per-turn tracking), as ``Session.stream()`` wires it;
   - ``sdk schema, orjson``: only the SDK's typed schema, ``SessionNotification.model_validate``
     on orjson's dict: the cost of adopting the schemas alone;
   - ``sdk schema, from JSON``: ``SessionNotification.model_validate_json`` on the bytes.

2. ``read+parse``: the whole stream as bytes through each side's real line reader (droidpool's
   ``LineReader`` in 64 KiB reads; the SDK's ``ProcessTransport.read_messages`` over an asyncio
   ``StreamReader``) and on to the same typed events as ``droidpool`` and ``sdk Session.stream``.

Each repetition times every path once over the whole stream (the order rotates) and reports
µs per event; min and median over ``--repeats``. The SDK paths are measured only when
``droid_sdk`` is importable (``pip install droid-sdk``; it is not a droidpool dependency); they
call the SDK's own internals as of droid-sdk 0.5.0.
Last, every recorded fixture in ``tests/fixtures`` and an ``agent_turn_completed`` with each
reason of ``tests/fixtures/droid_turn_end_reasons.json`` go through the SDK's typed schema, to
show which of droid's lines it cannot validate.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import statistics
import time
import types
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import anyio
import orjson

from droidpool.droid.lines import LineReader
from droidpool.droid.protocol import Notification, TextDelta, TurnCompleted, parse_line, turn_event

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
SOURCE = FIXTURES / "rpc_client_tools_single.stdout.jsonl"
REASONS = FIXTURES / "droid_turn_end_reasons.json"
WORDS = ("the", "pool", "keeps", "droid", "warm", "workers", "and", "streams", "tokens", "to",
         "clients", "über", "naïve", "—", "“quoted”", 'say "hi"', "back\\slash", "emoji 🙂", "日本語",
         "x = {\"a\": [1, 2]}", "tab\there", "", "a" * 40)
CHUNK = 64 * 1024


# --- the stream ----------------------------------------------------------------------------


def template() -> tuple[dict[str, Any], dict[str, Any]]:
    """A real assistant_text_delta line and the turn's agent_turn_completed, as droid wrote them."""
    delta = completed = None
    for line in SOURCE.read_bytes().splitlines():
        obj = orjson.loads(line)
        kind = obj.get("params", {}).get("notification", {}).get("type")
        if kind == "assistant_text_delta" and delta is None:
            delta = obj
        elif kind == "agent_turn_completed" and completed is None:
            completed = obj
    if delta is None or completed is None:
        raise SystemExit(f"{SOURCE} has no assistant_text_delta or agent_turn_completed line")
    return delta, completed


def stream(events: int, seed: int = 1) -> tuple[list[bytes], str]:
    """``events`` delta lines (droid's compact JSON, no newline) + the completion; the full text."""
    delta, completed = template()
    rng = random.Random(seed)
    lines, texts = [], []
    for _ in range(events):
        pieces = [rng.choice(WORDS) for _ in range(rng.randint(1, 4))]
        text = (" " if rng.random() < 0.7 else "") + " ".join(pieces) + ("\n" if rng.random() < 0.08 else "")
        note = dict(delta["params"]["notification"], textDelta=text)
        lines.append(orjson.dumps(dict(delta, params=dict(delta["params"], notification=note))))
        texts.append(text)
    lines.append(orjson.dumps(completed))
    return lines, "".join(texts)


# --- the parse paths: each returns the text it saw ------------------------------------------


def droidpool_parse(lines: list[bytes]) -> str:
    out = []
    for line in lines:
        message = parse_line(line)
        if isinstance(message, Notification):
            event = turn_event(message)
            if isinstance(event, TextDelta):
                out.append(event.text)
    return "".join(out)


def sdk_paths() -> dict[str, Callable[[list[bytes]], str]] | None:
    """The SDK's per-line paths, or None when droid_sdk is not installed."""
    try:
        from droid_sdk._high_level.messages import TextDelta as SdkTextDelta
        from droid_sdk._high_level.streaming import RunStream
        from droid_sdk.client import DroidClient
        from droid_sdk.protocol import ProtocolEngine
        from droid_sdk.schemas.cli import AssistantTextDeltaNotification, SessionNotification
        from droid_sdk.stream import AssistantTextDelta, _notification_to_stream_message
    except ImportError:
        return None

    def transport_line(line_bytes: bytes) -> dict[str, Any] | None:
        # ProcessTransport.read_messages, per line (it yields the parsed dict).
        line = line_bytes.decode("utf-8", errors="replace").strip()
        if not line or not line.startswith(("{", "[")):
            return None
        return json.loads(line)  # type: ignore[no-any-return]

    def wired(listener: Callable[[dict[str, Any]], None]) -> ProtocolEngine:
        # DroidClient.connect's wiring: engine -> client dispatch -> the caller's listener.
        client = DroidClient(transport=types.SimpleNamespace(is_connected=True))  # type: ignore[arg-type]
        engine = ProtocolEngine(transport=client._transport)  # type: ignore[arg-type]
        engine.on_notification(client._dispatch_notification)
        client.on_notification(listener)
        return engine

    def low_level(lines: list[bytes]) -> str:
        out: list[str] = []

        def listener(raw: dict[str, Any]) -> None:  # DroidClient.receive_response's, minus its queue
            parsed = SessionNotification.model_validate(raw)
            result = _notification_to_stream_message(parsed.params.notification)
            if isinstance(result, AssistantTextDelta):
                out.append(result.text)

        engine = wired(listener)
        for line in lines:
            message = transport_line(line)
            if message is not None:
                engine._handle_message(message)
        return "".join(out)

    def run_stream(completed: Any) -> RunStream[Any, Any]:
        turn_id = completed["params"]["notification"]["turnId"]
        return RunStream(expected_turn_id=turn_id, session_id="bench", include_partial_messages=True)

    def session_stream(lines: list[bytes]) -> str:
        sink = run_stream(orjson.loads(lines[-1]))
        engine = wired(sink.feed_notification)
        for line in lines:
            message = transport_line(line)
            if message is not None:
                engine._handle_message(message)
        return "".join(e.text for e in sink._queue if isinstance(e, SdkTextDelta))

    def schema_orjson(lines: list[bytes]) -> str:
        out = []
        for line in lines:
            note = SessionNotification.model_validate(orjson.loads(line)).params.notification
            if isinstance(note, AssistantTextDeltaNotification):
                out.append(note.text_delta)
        return "".join(out)

    def schema_json(lines: list[bytes]) -> str:
        out = []
        for line in lines:
            note = SessionNotification.model_validate_json(line).params.notification
            if isinstance(note, AssistantTextDeltaNotification):
                out.append(note.text_delta)
        return "".join(out)

    return {"sdk low-level": low_level, "sdk Session.stream": session_stream,
            "sdk schema, orjson": schema_orjson, "sdk schema, from JSON": schema_json}


# --- read+parse: each side's real line reader over the same bytes ---------------------------


class MemoryPipe:
    """A ByteReceiveStream over bytes, in pipe-sized reads."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._at = 0

    async def receive(self, max_bytes: int = CHUNK) -> bytes:
        if self._at >= len(self._data):
            raise anyio.EndOfStream
        chunk = bytes(self._data[self._at:self._at + min(max_bytes, CHUNK)])
        self._at += len(chunk)
        return chunk


def droidpool_read(data: bytes) -> str:
    async def run() -> str:
        reader = LineReader(MemoryPipe(data), 8 * 1024 * 1024)  # type: ignore[arg-type]
        out = []
        while (line := await reader.readline()) is not None:
            if not line.strip():
                continue
            message = parse_line(line)
            if isinstance(message, Notification):
                event = turn_event(message)
                if isinstance(event, TextDelta):
                    out.append(event.text)
                elif isinstance(event, TurnCompleted):
                    break
        return "".join(out)

    return anyio.run(run)


def sdk_read() -> Callable[[bytes], str] | None:
    try:
        from droid_sdk._high_level.messages import TextDelta as SdkTextDelta
        from droid_sdk._high_level.streaming import RunStream
        from droid_sdk.client import DroidClient
        from droid_sdk.protocol import ProtocolEngine
        from droid_sdk.transport import ProcessTransport
    except ImportError:
        return None

    def read(data: bytes) -> str:
        async def run() -> str:
            stdout = asyncio.StreamReader(limit=10 * 1024 * 1024)  # ProcessTransport's limit
            for at in range(0, len(data), CHUNK):
                stdout.feed_data(data[at:at + CHUNK])
            stdout.feed_eof()
            transport = ProcessTransport()
            transport._process = types.SimpleNamespace(stdout=stdout, returncode=0)  # type: ignore[assignment]
            transport._is_closing = True  # EOF ends the iterator instead of raising "process exited"
            last = data.rstrip(b"\n").rsplit(b"\n", 1)[-1]
            sink: RunStream[Any, Any] = RunStream(
                expected_turn_id=orjson.loads(last)["params"]["notification"]["turnId"],
                session_id="bench", include_partial_messages=True)
            client = DroidClient(transport=transport)
            engine = ProtocolEngine(transport=transport)
            engine.on_notification(client._dispatch_notification)
            client.on_notification(sink.feed_notification)
            async for message in transport.read_messages():  # ProtocolEngine._read_loop
                engine._handle_message(message)
            return "".join(e.text for e in sink._queue if isinstance(e, SdkTextDelta))

        return asyncio.run(run())

    return read


# --- measuring -------------------------------------------------------------------------------


def timed(fn: Callable[[Any], str], arg: Any, events: int, expected: str, name: str) -> float:
    gc.collect()
    started = time.perf_counter_ns()
    text = fn(arg)
    elapsed = time.perf_counter_ns() - started
    if text != expected:
        raise SystemExit(f"{name}: parsed text differs from what was sent ({len(text)} vs {len(expected)} chars)")
    return elapsed / 1000 / events


def rotations(names: list[str]) -> Iterator[list[str]]:
    index = 0
    while True:
        yield names[index % len(names):] + names[:index % len(names)]
        index += 1


def measure(paths: dict[str, Callable[[Any], str]], arg: Any, events: int, expected: str,
            repeats: int) -> dict[str, list[float]]:
    for name, fn in paths.items():  # warm-up: imports, pydantic's lazy schema build, caches
        timed(fn, arg, events, expected, name)
    samples: dict[str, list[float]] = {name: [] for name in paths}
    order = rotations(list(paths))
    for _ in range(repeats):
        for name in next(order):
            samples[name].append(timed(paths[name], arg, events, expected, name))
    return samples


def report(title: str, samples: dict[str, list[float]], base: str) -> None:
    print(f"\n{title}")
    print(f"  {'path':<24}{'min µs/event':>14}{'median µs/event':>17}{'× droidpool':>13}")
    reference = statistics.median(samples[base])
    for name, values in samples.items():
        median = statistics.median(values)
        print(f"  {name:<24}{min(values):>14.2f}{median:>17.2f}{median / reference:>13.1f}")


def fixture_check() -> None:
    """Which recorded droid lines the SDK's typed schema rejects."""
    from collections import Counter

    from droid_sdk.schemas.cli import CliRequestOrNotification
    from pydantic import ValidationError

    seen: Counter[str] = Counter()
    rejected: Counter[str] = Counter()
    for path in sorted(FIXTURES.glob("*.jsonl")):
        for line in path.read_bytes().splitlines():
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(obj, dict) or obj.get("type") not in ("notification", "request"):
                continue
            kind = obj.get("params", {}).get("notification", {}).get("type") or obj.get("method", "?")
            seen[kind] += 1
            try:
                CliRequestOrNotification.model_validate(obj)
            except ValidationError:
                rejected[kind] += 1
    total = sum(seen.values())
    print(f"\nSDK schema on the recorded fixtures ({total} notification/request lines of droid 0.225.2):")
    if not rejected:
        print("  all validate")
    for kind, count in rejected.most_common():
        print(f"  rejected: {kind} ({count} of {seen[kind]})")
    # Every agent_turn_completed reason droid 0.225.2 can emit (read from its binary).
    reasons = json.loads(REASONS.read_text())["reasons"]
    _, completed = template()
    refused = []
    for reason in reasons:
        note = dict(completed["params"]["notification"], reason=reason)
        try:
            line = dict(completed, params=dict(completed["params"], notification=note))
            CliRequestOrNotification.model_validate(line)
        except ValidationError:
            refused.append(reason)
    print(f"  agent_turn_completed reasons droid can emit: {len(reasons)}; the SDK rejects "
          f"{', '.join(refused) if refused else 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=2000, help="assistant_text_delta lines per stream")
    parser.add_argument("--repeats", type=int, default=30, help="timed passes over the stream, per path")
    args = parser.parse_args()
    lines, expected = stream(args.events)
    data = b"".join(line + b"\n" for line in lines)
    print(f"{args.events} assistant_text_delta lines + 1 agent_turn_completed "
          f"(median line {statistics.median(len(x) for x in lines):.0f} bytes), {args.repeats} repetitions")

    parse: dict[str, Callable[[Any], str]] = {"droidpool": droidpool_parse}
    read: dict[str, Callable[[Any], str]] = {"droidpool": droidpool_read}
    sdk, sdk_reader = sdk_paths(), sdk_read()
    if sdk is None or sdk_reader is None:
        print("droid_sdk is not importable: measuring droidpool only (pip install droid-sdk to compare)")
    else:
        print(f"droid-sdk {metadata.version('droid-sdk')}, pydantic {metadata.version('pydantic')}")
        parse.update(sdk)
        read["sdk Session.stream"] = sdk_reader

    report("parse: one line to a typed event", measure(parse, lines, args.events, expected, args.repeats),
           "droidpool")
    report("read+parse: bytes through the line reader to typed events",
           measure(read, data, args.events, expected, args.repeats), "droidpool")
    if sdk is not None:
        fixture_check()


if __name__ == "__main__":
    main()
