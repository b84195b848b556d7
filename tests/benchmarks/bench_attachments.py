"""Follow-up time to first token in a conversation that holds a 1 MB image, beside a text-only
one, through droidpool and through a raw droid, side by side in one run.

Run from the repository root::

    python -m tests.benchmarks.bench_attachments [--rounds N] [--image-bytes N]

One droidpool runs the real droid CLI against the scripted fake LLM (``custom:fake-vision``, which
takes images and answers at once). Each round runs four conversations and times their second
turn, streamed, from just before the request is sent to the first piece of answer text:

- ``text``: through droidpool, the first turn text only;
- ``image``: through droidpool, the first turn attaches a PNG of about ``--image-bytes`` (1 MB by
  default, a data URL of 1.3 MB), and the second turn resends the whole history, image included,
  as stateless clients (Claude Code, the openai SDK) do;
- ``raw text`` and ``raw image``: the same two conversations on a raw droid (a fresh process
  initialized as droidpool does, ``droid.add_user_message`` with ``images``), the second turn
  timed from ``add_user_message`` to the first text delta.

droidpool reads and hashes the resent image (without decoding it) to match the conversation, and
sends droid only the new message: the image is not sent again. droid itself does more work on
every turn whose history holds an image (it sends its re-encoded copy upstream each time): the raw
pair measures that. droidpool's own cost of the image is (image - text) - (raw image - raw text);
target: at most 15 ms. The order rotates from round to round, and no droid is starting while a
turn is timed.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from droidpool.config import ALL_TOOL_IDS
from tests.benchmarks.bench_dialects import chat_text, real_droid_daemon, rounds, settle, stream
from tests.benchmarks.bench_resume import summary
from tests.benchmarks.bench_ttft import RpcDroid, droid_env
from tests.media import b64, data_url, png_of_size

MODEL = "custom:fake-vision"
TARGET_MS = 15.0


def conversation(image: str | None) -> Any:
    async def run(http: aiohttp.ClientSession, base: str, tag: str) -> float:
        url = f"{base}/v1/chat/completions"
        content: Any = f"first {tag}"
        if image is not None:
            content = [{"type": "text", "text": f"first {tag}"}, {"type": "image_url", "image_url": {"url": image}}]
        messages: list[dict[str, Any]] = [{"role": "user", "content": content}]
        _, answer, _ = await stream(http, url, {"model": MODEL, "messages": messages, "stream": True}, chat_text)
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": f"second {tag}"}]
        await settle(http, base)
        ms, _, _ = await stream(http, url, {"model": MODEL, "messages": messages, "stream": True}, chat_text)
        return ms

    return run


def raw_conversation(binary: str, home: Path, image: str | None) -> Any:
    """The conversation on a raw droid of its own (started, initialized, stopped untimed)."""
    async def run(http: aiohttp.ClientSession, base: str, tag: str) -> float:
        work = home.parent / "raw" / uuid.uuid4().hex
        work.mkdir(parents=True)
        droid = await RpcDroid.start(binary, droid_env(home), work)
        try:
            await droid.call("droid.initialize_session", {
                "machineId": "droidpool-bench", "cwd": str(work), "modelId": MODEL,
                "disabledToolIds": list(ALL_TOOL_IDS)}, 30)
            await droid.call("droid.rename_session", {"title": "droidpool"}, 30)
            first: dict[str, Any] = {"text": f"first {tag}"}
            if image is not None:
                first["images"] = [{"type": "base64", "mediaType": "image/png", "data": image}]
            await droid.call("droid.add_user_message", first, 60)
            await wait_completed(droid)
            return await droid.timed_turn(f"second {tag}")
        finally:
            await droid.stop()

    return run


async def wait_completed(droid: RpcDroid) -> None:
    async with asyncio.timeout(60):
        while True:
            _, note = await droid.events.get()
            if note is None:
                raise RuntimeError("droid exited mid-turn")
            if note.get("type") == "agent_turn_completed":
                return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--image-bytes", type=int, default=1_000_000)
    args = parser.parse_args()
    image = png_of_size(args.image_bytes)
    with real_droid_daemon("attachments", MODEL) as (daemon, binary):
        print(f"droidpool + droid {binary}, model {MODEL}, a {len(image)}-byte PNG "
              f"({len(data_url(image))}-byte data URL), {args.rounds} rounds", flush=True)
        home = daemon.log_path.parent / "home"
        kinds = {"text": conversation(None), "image": conversation(data_url(image)),
                 "raw text": raw_conversation(binary, home, None), "raw image": raw_conversation(binary, home, b64(image))}
        samples = asyncio.run(rounds(daemon, args.rounds, kinds))
        print()
        print("Follow-up turn, time to first token (droidpool: stateless resend):")
        for name, values in samples.items():
            print(summary(name, values))
        median = {name: statistics.median(values) for name, values in samples.items()}
        through, raw = median["image"] - median["text"], median["raw image"] - median["raw text"]
        print(f"droidpool: image - text {through:+.1f} ms; raw droid: image - text {raw:+.1f} ms (droid's own work)")
        verdict = "within" if through - raw <= TARGET_MS else "OVER"
        print(f"droidpool's own cost of the image: {through - raw:+.1f} ms: {verdict} the {TARGET_MS:g} ms target")


if __name__ == "__main__":
    main()
