#!/usr/bin/env python3
"""A multi-turn conversation that continues one droid session by its X-Session-Id.

Usage:
    python examples/agent_session.py [--model MODEL] [--system TEXT] [TURN ...]

Each TURN argument is one user message; without any, one message per line is read from
stdin (interactive if stdin is a terminal; an empty line or EOF ends). MODEL defaults to
$DROIDPOOL_MODEL. Only the new user message is sent each turn: droid already holds the
conversation, and the X-Session-Id header names it. The system prompt goes with the first
turn only; the session keeps it.
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
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return
        yield line.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("DROIDPOOL_MODEL"))
    parser.add_argument("--system", help="system prompt for the new session")
    parser.add_argument("turns", nargs="*")
    args = parser.parse_args()
    if not args.model:
        parser.error("give --model or set DROIDPOOL_MODEL (ids: GET /v1/models)")

    client = openai.OpenAI(base_url=BASE_URL, api_key=os.environ.get("DROIDPOOL_API_KEY", "unused"))
    session_id: str | None = None
    for text in turns_from(args.turns):
        messages: list[dict[str, str]] = []
        if session_id is None and args.system:
            messages.append({"role": "system", "content": args.system})
        messages.append({"role": "user", "content": text})
        headers = {"X-Session-Id": session_id} if session_id else {}
        try:
            raw = client.chat.completions.with_raw_response.create(
                model=args.model, messages=messages, stream=True, extra_headers=headers  # type: ignore[arg-type]
            )
            session_id = raw.headers.get("x-session-id") or session_id
            print("droid> ", end="", flush=True)
            for chunk in raw.parse():
                if chunk.choices and chunk.choices[0].delta.content:
                    print(chunk.choices[0].delta.content, end="", flush=True)
            print()
        except openai.NotFoundError as exc:  # session_not_found: expired or deleted
            print(f"\nerror: {exc.message}", file=sys.stderr)
            return 1
        except openai.APIError as exc:
            # The session survives a failed turn: report it and go on with the next one.
            print(f"\nerror: {exc.message}", file=sys.stderr)
    if session_id:
        print(f"[session {session_id}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
