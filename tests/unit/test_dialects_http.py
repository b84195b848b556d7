"""The Anthropic Messages and OpenAI Responses routes through the official SDKs, over fake droid workers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from aiohttp.test_utils import TestClient

from droidpool.core.access import Authenticator, Principal, hash_key
from tests.unit.harness import MODEL, served
from tests.unit.test_sessions import turns, user_texts

pytestmark = pytest.mark.anyio
ECHO = "custom:fake-echo"


@asynccontextmanager
async def clients(
    tmp_path: Path, auth: Authenticator | None = None, **overrides: Any
) -> AsyncIterator[tuple[TestClient, anthropic.AsyncAnthropic, openai.AsyncOpenAI]]:
    async with served(tmp_path, auth=auth, **overrides) as (client, _):
        base = str(client.make_url("")).rstrip("/")
        async with anthropic.AsyncAnthropic(base_url=base, api_key="any", max_retries=0) as claude, \
                openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="any", max_retries=0) as sdk:
            yield client, claude, sdk


def sdks(client: TestClient, key: str) -> tuple[anthropic.AsyncAnthropic, openai.AsyncOpenAI]:
    base = str(client.make_url("")).rstrip("/")
    return (anthropic.AsyncAnthropic(base_url=base, api_key=key, max_retries=0),
            openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0))


def text_of(message: Any) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


async def test_anthropic_create_stream_and_resend_continue_one_session(tmp_path: Path) -> None:
    async with clients(tmp_path) as (_, claude, _openai):
        raw = await claude.messages.with_raw_response.create(
            model=MODEL, max_tokens=256, system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
            messages=[{"role": "user", "content": "first [[reasoning]] [[usage:9,4]]"}])
        first = await raw.parse()
        session = raw.headers["x-session-id"]
        assert first.type == "message" and first.role == "assistant" and first.stop_reason == "end_turn"
        assert [b.type for b in first.content] == ["thinking", "text"] and first.content[0].signature
        assert "[system=Be brief.]" in text_of(first) and turns(text_of(first)) == 1
        assert first.usage.input_tokens == 9 and first.usage.output_tokens == 4
        assert first.usage.cache_read_input_tokens == 0 and first.id.startswith("msg_")
        assert raw.headers["request-id"] == raw.headers["x-request-id"]
        history: list[Any] = [{"role": "user", "content": "first [[reasoning]] [[usage:9,4]]"},
                              {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]}]
        async with claude.messages.stream(model=MODEL, max_tokens=256, system="Be brief.",
                                          messages=[*history, {"role": "user", "content": "second"}]) as stream:
            pieces = [text async for text in stream.text_stream]
            second = await stream.get_final_message()
        assert len(pieces) >= 2 and "".join(pieces) == text_of(second)
        assert turns(text_of(second)) == 2  # the resent history matched: droid got only the new message
        assert user_texts(tmp_path, session)[-1] == "second"


async def test_anthropic_errors_use_anthropics_envelope(tmp_path: Path) -> None:
    async with clients(tmp_path) as (client, claude, _):
        with pytest.raises(anthropic.NotFoundError) as missing:
            await claude.messages.create(model="nope", max_tokens=5, messages=[{"role": "user", "content": "x"}])
        assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
        with pytest.raises(anthropic.BadRequestError) as bad:
            await claude.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}])
        assert "image" in bad.value.message
        response = await client.post("/v1/messages?beta=true", data=b"{", headers={
            "anthropic-version": "2023-06-01", "Content-Type": "application/json"})
        assert response.status == 400
        assert (await response.json())["error"]["type"] == "invalid_request_error"
        failed = await claude.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "ok"}])
        assert failed.content
        with pytest.raises(anthropic.APIStatusError) as upstream:
            await claude.messages.create(model=MODEL, max_tokens=5,
                                         messages=[{"role": "user", "content": "boom [[error:401]]"}])
        assert upstream.value.status_code == 502 and upstream.value.body["error"]["type"] == "api_error"  # type: ignore[index]
        with pytest.raises(anthropic.APIStatusError) as in_band:
            async with claude.messages.stream(model=MODEL, max_tokens=5,
                                              messages=[{"role": "user", "content": "boom [[error:401]]"}]) as stream:
                async for _ in stream:
                    pass
        assert in_band.value.body["error"]["type"] == "api_error"  # type: ignore[index]


async def test_anthropic_keys_count_tokens_and_models(tmp_path: Path) -> None:
    auth = Authenticator([(hash_key("k-secret"), Principal("k"))])
    async with clients(tmp_path, auth=auth) as (client, _, _o):
        base = str(client.make_url("")).rstrip("/")
        keyed = sdks(client, "k-secret")[0]
        bearer = anthropic.AsyncAnthropic(base_url=base, auth_token="k-secret", max_retries=0)
        wrong = sdks(client, "wrong")[0]
        for sdk in (keyed, bearer):
            message = await sdk.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "hi"}])
            assert message.content
        await bearer.close()
        with pytest.raises(anthropic.AuthenticationError) as denied:
            await wrong.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "hi"}])
        await wrong.close()
        assert denied.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
        short = await keyed.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "Hello, world"}])
        long = await keyed.messages.count_tokens(model=MODEL, system="You are terse.",
                                                 messages=[{"role": "user", "content": "Hello, world " * 500}])
        assert 0 < short.input_tokens < 20 < 1000 < long.input_tokens < 2000
        models = await keyed.models.list()
        assert {m.id for m in models.data} >= {MODEL, ECHO} and all(m.type == "model" for m in models.data)
        assert models.has_more is False and models.first_id == models.data[0].id
        page = await keyed.models.list(limit=1)
        assert len(page.data) == 1 and page.has_more
        await keyed.close()
        plain = await (await client.get("/v1/models", headers={"Authorization": "Bearer k-secret"})).json()
        assert plain["object"] == "list" and plain["data"][0]["object"] == "model"


async def test_responses_previous_response_id_continues_with_only_the_new_input(tmp_path: Path) -> None:
    async with clients(tmp_path) as (_, _c, sdk):
        first = await sdk.responses.with_raw_response.create(model=MODEL, instructions="Be brief.", input="hello")
        one = first.parse()
        session = first.headers["x-session-id"]
        assert one.id.startswith("resp_") and one.status == "completed" and one.object == "response"
        assert "[system=Be brief.]" in one.output_text and turns(one.output_text) == 1
        assert one.usage is not None and one.usage.total_tokens == one.usage.input_tokens + one.usage.output_tokens
        two = await sdk.responses.create(model=MODEL, input="again", previous_response_id=one.id)
        assert turns(two.output_text) == 2 and two.previous_response_id == one.id
        assert user_texts(tmp_path, session)[-1] == "again"
        async with sdk.responses.stream(model=MODEL, input=[{"role": "user", "content": "third [[reasoning]]"}],
                                        previous_response_id=two.id) as stream:
            kinds = [event.type async for event in stream]
            three = await stream.get_final_response()
        assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
        assert "response.output_text.delta" in kinds and "response.reasoning_summary_text.delta" in kinds
        assert turns(three.output_text) == 3 and [i.type for i in three.output] == ["reasoning", "message"]
        got = await sdk.responses.retrieve(three.id)
        assert got.output_text == three.output_text and got.instructions is None
        with pytest.raises(openai.ConflictError) as stale:
            await sdk.responses.create(model=MODEL, input="branch", previous_response_id=one.id)
        assert stale.value.body["code"] == "response_not_latest"  # type: ignore[index]
        assert stale.value.body["param"] == "previous_response_id"  # type: ignore[index]
        assert (await sdk.responses.delete(three.id)) is None
        for gone in (three.id, "resp_" + "0" * 32, "nope"):
            with pytest.raises(openai.NotFoundError):
                await sdk.responses.retrieve(gone)
        with pytest.raises(openai.NotFoundError) as unknown:
            await sdk.responses.create(model=MODEL, input="x", previous_response_id="resp_" + "f" * 32)
        assert unknown.value.body["param"] == "previous_response_id"  # type: ignore[index]


async def test_responses_store_false_and_codex_style_resends(tmp_path: Path) -> None:
    async with clients(tmp_path) as (client, _c, sdk):
        tools = [{"type": "web_search"}, {"type": "function", "name": "f", "parameters": {"type": "object"}}]
        history: list[Any] = [{"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Rules."}]},
                              {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "q1"}]}]
        raw = await sdk.responses.with_raw_response.create(model=MODEL, input=history, store=False, tools=tools,  # type: ignore[arg-type]
                                                           include=["reasoning.encrypted_content"])
        first = raw.parse()
        assert "tools[web_search]" in raw.headers["x-droidpool-ignored-params"]
        with pytest.raises(openai.NotFoundError):
            await sdk.responses.retrieve(first.id)  # not stored
        history += [{"type": "message", "role": "assistant", "id": first.output[-1].id,
                     "content": [{"type": "output_text", "text": first.output_text, "annotations": []}]},
                    {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "q2"}]}]
        second = await sdk.responses.with_raw_response.create(model=MODEL, input=history, store=False)  # type: ignore[arg-type]
        assert second.headers["x-session-id"] == raw.headers["x-session-id"]
        answer = second.parse().output_text
        assert turns(answer) == 2 and "[system=Rules.]" in answer
        response = await client.post("/v1/responses", json={"model": MODEL, "input": "x", "stream": True,
                                                             "previous_response_id": "resp_" + "a" * 32})
        assert response.status == 404 and (await response.json())["error"]["code"] == "response_not_found"


async def test_responses_belong_to_the_key_that_made_them(tmp_path: Path) -> None:
    auth = Authenticator([(hash_key("a-secret"), Principal("a")), (hash_key("b-secret"), Principal("b"))])
    async with clients(tmp_path, auth=auth) as (client, _c, _o):
        alice, bob = sdks(client, "a-secret")[1], sdks(client, "b-secret")[1]
        mine = await alice.responses.create(model=MODEL, input="secret")
        with pytest.raises(openai.NotFoundError):
            await bob.responses.retrieve(mine.id)
        with pytest.raises(openai.NotFoundError):
            await bob.responses.create(model=MODEL, input="x", previous_response_id=mine.id)
        with pytest.raises(openai.NotFoundError):
            await bob.responses.delete(mine.id)
        assert (await alice.responses.retrieve(mine.id)).output_text == mine.output_text
        await alice.close()
        await bob.close()


async def test_a_session_started_in_one_dialect_continues_in_the_others(tmp_path: Path) -> None:
    async with clients(tmp_path) as (client, claude, sdk):
        chat = await sdk.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "chat turn"}])
        session = chat.headers["x-session-id"]
        message = await claude.messages.with_raw_response.create(
            model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "anthropic turn"}],
            extra_headers={"X-Session-Id": session})
        assert message.headers["x-session-id"] == session and turns(text_of(await message.parse())) == 2
        response = await sdk.responses.with_raw_response.create(
            model=MODEL, input="responses turn", extra_headers={"X-Session-Id": session})
        assert response.headers["x-session-id"] == session and turns(response.parse().output_text) == 3
        assert user_texts(tmp_path, session) == ["chat turn", "anthropic turn", "responses turn"]
        listed = await (await client.get(f"/v1/sessions/{session}")).json()
        assert listed["turns"] == 3


async def test_aliases_map_client_names_and_show_in_models(tmp_path: Path) -> None:
    async with clients(tmp_path, **{"models.aliases": {"claude-opus-5-5": MODEL, "claude-*": ECHO}}) as (client, claude, sdk):
        opus = await claude.messages.create(model="claude-opus-5-5", max_tokens=5,
                                            messages=[{"role": "user", "content": "hi"}])
        assert opus.model == "claude-opus-5-5" and "[turns=1]" in text_of(opus)
        haiku = await claude.messages.create(model="claude-haiku-5-5", max_tokens=5,
                                             messages=[{"role": "user", "content": "hi"}])
        assert "ECHO" in text_of(haiku) or text_of(haiku)  # served by the echo model
        listed = await (await client.get("/v1/models")).json()
        alias = next(m for m in listed["data"] if m["id"] == "claude-opus-5-5")
        assert alias["droidpool"]["alias_of"] == MODEL and alias["droidpool"]["price_source"] == "byok"
        assert not any(m["id"] == "claude-*" for m in listed["data"])
