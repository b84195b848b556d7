"""Every way droid 0.225.2 can end a turn badly, over HTTP in each dialect: the fake droid's
``[[fail:REASON]]`` ends the turn with REASON (droid's error notification and its user-only
"BYOK Error" message first), and the client gets ``droidpool.core.failures.failure_for``'s error
in its dialect's envelope: as the HTTP status and body when not streamed, in-band when streamed.

One in-process daemon (``tests/unit/harness.served``) per dialect; all reasons run through it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from droidpool import errors
from droidpool.api import anthropic, openai_chat, responses
from droidpool.api.dialect import Dialect
from droidpool.core import failures
from droidpool.core.failures import failure_for
from tests.unit.harness import MODEL, served

pytestmark = pytest.mark.anyio

FIXTURE = Path(__file__).parents[1] / "fixtures" / "droid_turn_end_reasons.json"
REASONS = sorted(set(json.loads(FIXTURE.read_text())["reasons"]) - failures.SUCCESS_REASONS)

DIALECTS: dict[str, tuple[Dialect, str]] = {
    "openai": (openai_chat.DIALECT, "/v1/chat/completions"),
    "anthropic": (anthropic.DIALECT, "/v1/messages"),
    "responses": (responses.DIALECT, "/v1/responses"),
}


def request_body(dialect: str, text: str, stream: bool) -> dict[str, Any]:
    if dialect == "openai":
        return {"model": MODEL, "stream": stream, "messages": [{"role": "user", "content": text}]}
    if dialect == "anthropic":
        return {"model": MODEL, "max_tokens": 64, "stream": stream, "messages": [{"role": "user", "content": text}]}
    return {"model": MODEL, "stream": stream, "input": text}


def expected(reason: str) -> errors.DroidpoolError:
    """What droidpool should make of the fake's failure (its words: "Simulated failure (REASON)")."""
    error = failure_for(reason, [f"Simulated failure ({reason})"])
    assert error is not None
    return error


def sse_events(text: str) -> list[tuple[str | None, Any]]:
    """(event name, data) of each server-sent event; data parsed as JSON where it is JSON."""
    out: list[tuple[str | None, Any]] = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if not data:
            continue
        joined = "\n".join(data)
        try:
            out.append((name, json.loads(joined)))
        except ValueError:
            out.append((name, joined))
    return out


def check_message(message: str, reason: str, where: str) -> list[str]:
    problems = []
    entry = failures.TABLE[reason]
    if not message.startswith(entry.message):
        problems.append(f"{where}: message {message!r} does not start with the table's {entry.message!r}")
    if f"Simulated failure ({reason})" not in message:
        problems.append(f"{where}: message {message!r} lacks droid's words")
    return problems


def in_band(dialect: str, events: list[tuple[str | None, Any]], error: errors.DroidpoolError) -> tuple[str, dict[str, Any]]:
    """The error event of a failed stream, checked for the dialect's shape; (message, comparable)."""
    if dialect == "openai":
        found = [d for _, d in events if isinstance(d, dict) and "error" in d]
        assert len(found) == 1 and events[-1][1] == "[DONE]", events
        detail = found[0]["error"]
        _, body = openai_chat.DIALECT.error_body(error)
        want = body["error"]
        return detail["message"], {"got": {k: detail.get(k) for k in ("type", "code", "param")},
                                   "want": {k: want[k] for k in ("type", "code", "param")}}
    if dialect == "anthropic":
        found = [d for name, d in events if name == "error"]
        assert len(found) == 1 and events[-1][0] == "error", events  # the stream ends with the error
        (data,) = found
        _, body = anthropic.DIALECT.error_body(error)
        return data["error"]["message"], {"got": {"type": data["type"], "error.type": data["error"]["type"]},
                                          "want": {"type": "error", "error.type": body["error"]["type"]}}
    found = [d for name, d in events if name == "response.failed"]
    assert len(found) == 1 and events[-1][0] == "response.failed", events
    response = found[0]["response"]
    detail = response["error"]
    return detail["message"], {"got": {"status": response["status"], "code": detail["code"]},
                               "want": {"status": "failed", "code": error.error_code or error.kind}}


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
async def test_each_turn_end_reason_reaches_the_client_in_its_dialect(tmp_path: Path, dialect: str) -> None:
    assert len(REASONS) == 16  # droid 0.225.2's 18 reasons, less completed and spec_handoff
    assert set(REASONS) == set(failures.TABLE)
    wire, path = DIALECTS[dialect]
    problems: list[str] = []
    async with served(tmp_path) as (client, _):
        for reason in REASONS:
            error = expected(reason)
            want_status, want_body = wire.error_body(error)
            text = f"please fail [[fail:{reason}]]"

            # Not streamed: the status and the envelope.
            response = await client.post(path, json=request_body(dialect, text, stream=False))
            body = await response.json()
            where = f"{reason} (not streamed)"
            if response.status != want_status:
                problems.append(f"{where}: status {response.status}, want {want_status}: {body}")
            if "error" not in body:
                problems.append(f"{where}: no error envelope: {body}")
                continue
            got = body["error"]
            if dialect == "anthropic":
                if body.get("type") != "error" or set(got) != {"type", "message"} or got["type"] != want_body["error"]["type"]:
                    problems.append(f"{where}: {body}, want the shape and type of {want_body}")
            else:
                if set(got) != {"message", "type", "param", "code"}:
                    problems.append(f"{where}: envelope keys {sorted(got)}")
                for key in ("type", "code", "param"):
                    if got.get(key) != want_body["error"][key]:
                        problems.append(f"{where}: {key} {got.get(key)!r}, want {want_body['error'][key]!r}")
            problems += check_message(got.get("message", ""), reason, where)
            retry = error.headers().get("Retry-After")
            if response.headers.get("Retry-After") != retry:
                problems.append(f"{where}: Retry-After {response.headers.get('Retry-After')!r}, want {retry!r}")
            if not response.headers.get("X-Session-Id"):
                problems.append(f"{where}: no X-Session-Id on the error")

            # Streamed: a 200, then the error in-band, in the dialect's shape.
            response = await client.post(path, json=request_body(dialect, text, stream=True))
            where = f"{reason} (streamed)"
            raw = await response.text()
            if response.status != 200 or not response.headers.get("Content-Type", "").startswith("text/event-stream"):
                problems.append(f"{where}: status {response.status} {response.headers.get('Content-Type')}: {raw[:300]}")
                continue
            try:
                message, compared = in_band(dialect, sse_events(raw), error)
            except AssertionError as exc:
                problems.append(f"{where}: no error event in the dialect's shape: {exc}"[:1500])
                continue
            if compared["got"] != compared["want"]:
                problems.append(f"{where}: {compared['got']}, want {compared['want']}")
            problems += check_message(message, reason, where)
    assert not problems, "\n".join(problems)
