#!/usr/bin/env python3
"""A multi-turn conversation over OpenAI Responses, continued by previous_response_id.

Usage:
    python examples/responses_session.py [--model MODEL] [--instructions TEXT] [TURN ...]

Each TURN argument is one user message; without any, one message per line is read from
stdin (an empty line or EOF ends). MODEL defaults to $DROIDPOOL_MODEL. Each turn sends only
the new input and the previous response's id: droidpool continues that response's droid
session on the worker that holds it, and nothing is re-sent.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator

import openai

BASE_URL = os.environ.get("DROIDPOOL_URL", "http://127.0.0.1:8765") + "/v1"


def turns_from(args: list[str]) -> Iterator[str]:
    if args:
        yield from args
        return
    while True:
        if sys.stdin.isatty():
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return
        yield line.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("DROIDPOOL_MODEL"))
    parser.add_argument("--instructions", help="the system prompt of the new conversation")
    parser.add_argument("turns", nargs="*")
    args = parser.parse_args()
    if not args.model:
        parser.error("give --model or set DROIDPOOL_MODEL (ids: GET /v1/models)")

    client = openai.OpenAI(base_url=BASE_URL, api_key=os.environ.get("DROIDPOOL_API_KEY", "unused"))
    previous: str | None = None
    for text in turns_from(args.turns):
        try:
            stream = client.responses.create(
                model=args.model,
                input=text,
                instructions=args.instructions if previous is None else openai.NOT_GIVEN,
                previous_response_id=previous or openai.NOT_GIVEN,
                stream=True,
            )
            print("droid> ", end="", file=sys.stderr, flush=True)
            for event in stream:
                if event.type == "response.output_text.delta":
                    print(event.delta, end="", flush=True)
                elif event.type == "response.completed":
                    previous = event.response.id
                elif event.type == "response.failed":
                    error = event.response.error
                    print(f"\nerror: {error.message if error else 'the turn failed'}", file=sys.stderr)
                    return 1
            print()
        except openai.APIError as exc:
            print(f"\nerror: {exc.message}", file=sys.stderr)
            return 1
    if previous:
        print(f"[last response {previous}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
