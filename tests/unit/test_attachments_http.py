"""Images, documents and structured output over HTTP, through fake droid workers that check and
answer them as droid 0.225.2 does (tests/fixtures/rpc_attach_*, rpc_structured_*)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from aiohttp.test_utils import TestClient

from tests.media import b64, data_url, pdf, png, png_of_size
from tests.unit.harness import MODEL, served

pytestmark = pytest.mark.anyio
VISION = "custom:fake-vision"
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "temp": {"type": "number"}},
          "required": ["city", "temp"], "additionalProperties": False}
GIF = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"


@asynccontextmanager
async def clients(tmp_path: Path, **overrides: Any) -> AsyncIterator[tuple[TestClient, anthropic.AsyncAnthropic,
                                                                         openai.AsyncOpenAI, Path]]:
    log = tmp_path / "droid-requests.log"
    env = {"FAKE_DROID_MODELS": VISION, "FAKE_DROID_LOG": str(log)}
    async with served(tmp_path, **{"droid.env": env, **overrides}) as (client, _):
        base = str(client.make_url("")).rstrip("/")
        async with anthropic.AsyncAnthropic(base_url=base, api_key="any", max_retries=0) as claude, \
                openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="any", max_retries=0) as sdk:
            yield client, claude, sdk, log


def turns_sent(log: Path) -> int:
    return log.read_text().splitlines().count("droid.add_user_message") if log.exists() else 0


def image_part(image: bytes = png()) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": data_url(image)}}


async def test_an_image_reaches_droid_and_a_resend_does_not_send_it_again(tmp_path: Path) -> None:
    async with clients(tmp_path) as (client, _, sdk, _log):
        messages: list[Any] = [{"role": "user", "content": [{"type": "text", "text": "look"}, image_part()]}]
        raw = await sdk.chat.completions.with_raw_response.create(model=VISION, messages=messages)
        first = raw.parse()
        assert "[images=1]" in (first.choices[0].message.content or "")
        session = raw.headers["x-session-id"]
        messages += [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "and now?"}]
        raw = await sdk.chat.completions.with_raw_response.create(model=VISION, messages=messages)
        assert raw.headers["x-session-id"] == session  # the resent image matched its conversation
        assert "[images=" not in (raw.parse().choices[0].message.content or "")  # droid got no image again
        usage = await (await client.get("/v1/usage", params={"by": "session"})).json()
        (group,) = [g for g in usage["groups"] if g["session"] == session]
        assert group["turns"] == 2 and group["attachments"] == 1 and group["attachment_bytes"] == len(png())


async def test_documents_go_to_droid_as_files(tmp_path: Path) -> None:
    async with clients(tmp_path) as (_, claude, _sdk, _log):
        message = await claude.messages.create(model=MODEL, max_tokens=64, messages=[{"role": "user", "content": [
            {"type": "document", "title": "doc.pdf",
             "source": {"type": "base64", "media_type": "application/pdf", "data": b64(pdf())}},
            {"type": "document", "title": "notes.md", "source": {"type": "text", "media_type": "text/markdown",
                                                                 "data": "# notes"}},
            {"type": "text", "text": "summarize"}]}])
        assert "[files=doc.pdf,notes.md]" in message.content[0].text  # type: ignore[union-attr]


def bad_bodies(model: str, part: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """One request per dialect carrying ``part`` (an image given as a data URL in each's shape)."""
    url = part["image_url"]["url"]
    media_type, data = url[5:].split(";base64,", 1)
    return {
        "chat": ("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": [part]}]}),
        "messages": ("/v1/messages", {"model": model, "max_tokens": 9, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}]}]}),
        "responses": ("/v1/responses", {"model": model, "input": [{"role": "user", "content": [
            {"type": "input_image", "image_url": url}]}]}),
    }


@pytest.mark.parametrize(("model", "image", "code"), [
    (VISION, png_of_size(5000), "attachment_too_large"),
    (VISION, GIF, "unsupported_attachment"),
    (VISION, png()[:-20], "corrupt_attachment"),
    (MODEL, png(), "model_no_image_support"),
], ids=["oversized", "gif", "truncated", "no-image-model"])
async def test_bad_images_get_a_400_in_every_envelope_and_droid_sees_nothing(
        tmp_path: Path, model: str, image: bytes, code: str) -> None:
    async with clients(tmp_path, **{"attachments.max_image_bytes": 1000}) as (client, _, _sdk, log):
        for dialect, (path, body) in bad_bodies(model, image_part(image)).items():
            response = await client.post(path, json=body)
            assert response.status == 400, dialect
            payload = await response.json()
            error = payload["error"]
            if dialect == "messages":
                assert payload["type"] == "error" and error["type"] == "invalid_request_error"
            else:
                assert error["code"] == code and error["param"].endswith(("[0]", "image_url")), error
        assert turns_sent(log) == 0


async def test_corrupt_base64_and_bad_schemas_are_400s(tmp_path: Path) -> None:
    async with clients(tmp_path) as (client, _, _sdk, log):
        response = await client.post("/v1/chat/completions", json={"model": VISION, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!not base64!!"}}]}]})
        assert response.status == 400 and "corrupt" in (await response.json())["error"]["message"]
        for path, body in (
            ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                      "response_format": {"type": "json_schema", "json_schema": {
                                          "name": "x", "schema": {"type": "nonsense"}}}}),
            ("/v1/responses", {"model": MODEL, "input": "x", "text": {"format": {
                "type": "json_schema", "name": "x", "schema": {"type": "object", "required": "city"}}}}),
            ("/v1/messages", {"model": MODEL, "max_tokens": 9, "messages": [{"role": "user", "content": "x"}],
                              "output_config": {"format": {"type": "json_schema", "schema": {"type": "array"}}}}),
        ):
            response = await client.post(path, json=body)
            assert response.status == 400, path
        assert turns_sent(log) == 0


async def test_structured_output_holds_rejected_attempts_back(tmp_path: Path) -> None:
    async with clients(tmp_path) as (_, claude, sdk, _log):
        answer = '{"city": "Paris", "temp": 21.5}'
        text = f"weather? [[attempts:not json||{{\"city\": 3}}||{answer}]]"
        fmt = {"type": "json_schema", "json_schema": {"name": "Weather", "schema": SCHEMA, "strict": True}}
        pieces = []
        async with await sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}],
                                                     response_format=fmt, stream=True) as stream:  # type: ignore[arg-type]
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces.append(chunk.choices[0].delta.content)
        assert "".join(pieces) == answer  # never a word of the two rejected attempts
        completion = await sdk.chat.completions.create(model=MODEL, response_format=fmt,  # type: ignore[arg-type]
                                                       messages=[{"role": "user", "content": f"q [[json:{answer}]]"}])
        assert json.loads(completion.choices[0].message.content or "") == {"city": "Paris", "temp": 21.5}
        message = await claude.messages.create(
            model=MODEL, max_tokens=64, messages=[{"role": "user", "content": f"q [[json:{answer}]]"}],
            extra_body={"output_config": {"format": {"type": "json_schema", "schema": SCHEMA}}})
        assert json.loads(message.content[0].text) == {"city": "Paris", "temp": 21.5}  # type: ignore[union-attr]
        response = await sdk.responses.create(model=MODEL, input=f"q [[json:{answer}]]", text={"format": {
            "type": "json_schema", "name": "Weather", "schema": SCHEMA, "strict": True}})
        assert json.loads(response.output_text) == {"city": "Paris", "temp": 21.5}
        assert response.text.format.type == "json_schema"  # type: ignore[union-attr]


async def test_an_answer_that_never_matches_is_an_error_in_every_dialect(tmp_path: Path) -> None:
    async with clients(tmp_path) as (client, _, _sdk, _log):
        bad = "q [[json:not json]]"
        fmt = {"type": "json_schema", "schema": SCHEMA}
        for path, body in (
            ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": bad}],
                                      "response_format": {"type": "json_schema", "json_schema": {"name": "w", **fmt}}}),
            ("/v1/responses", {"model": MODEL, "input": bad, "text": {"format": {"name": "w", **fmt}}}),
            ("/v1/messages", {"model": MODEL, "max_tokens": 9, "messages": [{"role": "user", "content": bad}],
                              "output_config": {"format": fmt}}),
        ):
            response = await client.post(path, json=body)
            payload = await response.json()
            assert response.status == 502, path
            if path == "/v1/messages":
                assert payload["error"]["type"] == "api_error" and "schema" in payload["error"]["message"]
            else:
                assert payload["error"]["code"] == "structured_output_invalid"
        stream = await client.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": bad}], "stream": True,
            "response_format": {"type": "json_schema", "json_schema": {"name": "w", **fmt}}})
        events = [json.loads(line[6:]) for line in (await stream.text()).splitlines()
                  if line.startswith("data: {")]
        assert events[-1]["error"]["code"] == "structured_output_invalid"
        assert not any(e.get("choices") and e["choices"][0]["delta"].get("content") for e in events)


async def test_an_image_droid_cannot_shrink_is_a_400(tmp_path: Path) -> None:
    async with clients(tmp_path) as (client, _, _sdk, _log):
        response = await client.post("/v1/chat/completions", json={"model": VISION, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "x [[image_error]]"}, image_part()]}]})
        payload = await response.json()
        assert response.status == 400 and payload["error"]["code"] == "image_not_processed", payload


async def test_images_in_tool_results_reach_droid_and_bad_ones_release_the_park(tmp_path: Path) -> None:
    tool = {"name": "get_chart", "description": "A chart.", "input_schema": {"type": "object"}}
    async with clients(tmp_path) as (client, claude, _sdk, _log):
        history: list[Any] = [{"role": "user", "content": "chart? [[call:get_chart:{}]]"}]
        first = await claude.messages.create(model=VISION, max_tokens=64, tools=[tool],  # type: ignore[list-item]
                                             messages=history)
        assert first.stop_reason == "tool_use"
        (use,) = [b for b in first.content if b.type == "tool_use"]
        history += [{"role": "assistant", "content": [b.model_dump() for b in first.content]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": [
                        {"type": "text", "text": "the chart"},
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64(png())}}]}]}]
        second = await claude.messages.create(model=VISION, max_tokens=64, tools=[tool],  # type: ignore[list-item]
                                              messages=history)
        assert "the chart [+1 image(s)]" in second.content[0].text  # type: ignore[union-attr]

        # A result droidpool can never take (a GIF): a 400, and the parked turn gives its worker back now.
        history = [{"role": "user", "content": "again? [[call:get_chart:{}]]"}]
        first = await claude.messages.create(model=VISION, max_tokens=64, tools=[tool],  # type: ignore[list-item]
                                             messages=history)
        (use,) = [b for b in first.content if b.type == "tool_use"]
        assert (await (await client.get("/readyz")).json())["client_tools"]["parked"] == 1
        history += [{"role": "assistant", "content": [b.model_dump() for b in first.content]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": [
                        {"type": "image", "source": {"type": "base64", "media_type": "image/gif", "data": b64(GIF)}}]}]}]
        with pytest.raises(anthropic.BadRequestError) as info:
            await claude.messages.create(model=VISION, max_tokens=64, tools=[tool],  # type: ignore[list-item]
                                         messages=history)
        assert "PNG and JPEG" in str(info.value)
        assert (await (await client.get("/readyz")).json())["client_tools"]["parked"] == 0
        usage = await (await client.get("/v1/usage", params={"by": "status"})).json()
        assert any(g["status"] == "resume_refused" for g in usage["groups"])
