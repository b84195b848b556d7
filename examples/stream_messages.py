#!/usr/bin/env python3
"""Stream one Anthropic Messages answer from droidpool with the official anthropic SDK.

Usage:
    python examples/stream_messages.py [MODEL] [PROMPT...]

MODEL defaults to $DROIDPOOL_MODEL (an id from `curl http://127.0.0.1:8765/v1/models`, or a
name that [models] aliases maps). Answer text goes to stdout as it arrives; thinking, the
session id and the token counts go to stderr.
"""

from __future__ import annotations

import os
import sys

import anthropic

BASE_URL = os.environ.get("DROIDPOOL_URL", "http://127.0.0.1:8765")


def main() -> int:
    model = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("DROIDPOOL_MODEL")
    if not model:
        print(__doc__, file=sys.stderr)
        return 2
    prompt = " ".join(sys.argv[2:]) or "Describe a river delta in three sentences."
    # The key matters only once droidpool has API keys configured.
    client = anthropic.Anthropic(base_url=BASE_URL, api_key=os.environ.get("DROIDPOOL_API_KEY", "unused"))
    try:
        with client.messages.stream(
            model=model,
            max_tokens=4096,  # required by the API; droid decides the length
            system="You are concise.",
            messages=[{"role": "user", "content": prompt}],
        ) as stream:
            print(f"[session {stream.response.headers.get('x-session-id')}]", file=sys.stderr)
            for event in stream:
                if event.type == "content_block_delta" and event.delta.type == "thinking_delta":
                    print(event.delta.thinking, end="", file=sys.stderr, flush=True)
                elif event.type == "content_block_delta" and event.delta.type == "text_delta":
                    print(event.delta.text, end="", flush=True)
            message = stream.get_final_message()
        print()
    except anthropic.APIError as exc:  # also raised for an in-band error after the 200
        print(f"\nerror: {exc.message}", file=sys.stderr)
        return 1
    print(f"[{message.usage.input_tokens} input + {message.usage.output_tokens} output tokens, "
          f"stop: {message.stop_reason}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
