#!/usr/bin/env python3
"""Stream one chat completion from droidpool with the official openai SDK.

Usage:
    python examples/stream_chat.py [MODEL] [PROMPT...]

MODEL defaults to $DROIDPOOL_MODEL; `curl http://127.0.0.1:8765/v1/models` lists the ids.
Answer tokens go to stdout as they arrive; reasoning (if the model streams any) and the
session id go to stderr.
"""

from __future__ import annotations

import os
import sys

import openai

BASE_URL = os.environ.get("DROIDPOOL_URL", "http://127.0.0.1:8765") + "/v1"


def main() -> int:
    model = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("DROIDPOOL_MODEL")
    if not model:
        print(__doc__, file=sys.stderr)
        return 2
    prompt = " ".join(sys.argv[2:]) or "Describe a river delta in three sentences."
    # The key matters only once droidpool has API keys configured.
    client = openai.OpenAI(base_url=BASE_URL, api_key=os.environ.get("DROIDPOOL_API_KEY", "unused"))
    try:
        raw = client.chat.completions.with_raw_response.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            stream=True,
            stream_options={"include_usage": True},
        )
        print(f"[session {raw.headers.get('x-session-id')}]", file=sys.stderr)
        usage = None
        thinking = False
        for chunk in raw.parse():
            if chunk.usage is not None:
                usage = chunk.usage
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            # reasoning_content is not an OpenAI field: the SDK keeps it in model_extra.
            reasoning = (delta.model_extra or {}).get("reasoning_content")
            if reasoning:
                thinking = True
                print(reasoning, end="", file=sys.stderr, flush=True)
            if delta.content:
                if thinking:
                    thinking = False
                    print(file=sys.stderr)
                print(delta.content, end="", flush=True)
        print()
    except openai.APIError as exc:  # also raised for an in-band error after the 200
        print(f"\nerror: {exc.message}", file=sys.stderr)
        return 1
    if usage is not None:
        print(f"[{usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens]",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
