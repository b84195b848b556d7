#!/usr/bin/env python3
"""An agent loop with client-defined tools: the model calls them, this script runs them locally
and sends the results back, until the model answers in text.

Usage:
    python examples/tool_loop.py [--model MODEL] PROMPT

MODEL defaults to $DROIDPOOL_MODEL. Two tools are defined here: ``get_time`` (the local time,
for real) and ``word_count`` (the words in a file under the current directory). Each call and
its result are printed to stderr; the answer to stdout. The whole history is resent each
round (stateless, as most agents do): droidpool matches it to the droid turn that waits for the
results and carries that same turn on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import openai

BASE_URL = os.environ.get("DROIDPOOL_URL", "http://127.0.0.1:8765") + "/v1"
MAX_ROUNDS = 8
TOOLS: list[Any] = [
    {"type": "function", "function": {
        "name": "get_time", "description": "The current local time, as HH:MM:SS.",
        "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {
        "name": "word_count", "description": "How many words a text file in the current directory holds.",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}},
]


def run_tool(name: str, arguments: str) -> str:
    try:
        args = json.loads(arguments or "{}")
        if name == "get_time":
            return time.strftime("%H:%M:%S")
        if name == "word_count":
            path = (Path.cwd() / str(args["path"])).resolve()
            if Path.cwd().resolve() not in path.parents:
                return "error: only files under the current directory"
            return str(len(path.read_text(errors="replace").split()))
        return f"error: no tool {name!r}"
    except (OSError, ValueError, KeyError) as exc:
        return f"error: {exc}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("DROIDPOOL_MODEL"))
    parser.add_argument("prompt")
    args = parser.parse_args()
    if not args.model:
        parser.error("give --model or set DROIDPOOL_MODEL (ids: GET /v1/models)")
    client = openai.OpenAI(base_url=BASE_URL, api_key=os.environ.get("DROIDPOOL_API_KEY", "unused"))
    messages: list[Any] = [{"role": "user", "content": args.prompt}]
    for _ in range(MAX_ROUNDS):
        try:
            choice = client.chat.completions.create(model=args.model, messages=messages, tools=TOOLS).choices[0]
        except openai.APIError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            return 1
        messages.append(choice.message.model_dump(exclude_none=True))
        if choice.finish_reason != "tool_calls":
            print(choice.message.content or "")
            return 0
        for call in choice.message.tool_calls or []:
            result = run_tool(call.function.name, call.function.arguments)
            print(f"[{call.function.name}({call.function.arguments}) -> {result}]", file=sys.stderr)
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    print(f"error: no answer after {MAX_ROUNDS} rounds of tool calls", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
