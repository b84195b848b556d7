"""End to end through the official anthropic and openai SDKs and langchain-anthropic:
droidpool → the real droid CLI → the fake LLM, in the Anthropic Messages and OpenAI Responses dialects."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from tests import fakellm
from tests.conftest import Daemon, FakeLLMProcess, start_daemon, write_droid_home

pytestmark = pytest.mark.real_droid
PACED = "custom:fake-paced"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, real_droid: str, fake_llm: FakeLLMProcess) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("dialects")
    home = write_droid_home(tmp / "home", fake_llm.url)
    daemon = start_daemon(
        tmp,
        {
            "droid": {"binary": real_droid, "home": str(home), "airgap": True},
            "pool": {"max_workers": 3, "models": [{"id": PACED}], "idle_min": 1},
            "models": {"aliases": {"claude-opus-5-5": PACED}},
            "deadlines": {"first_token_s": 20.0, "turn_s": 60.0},
        },
        ready_timeout=60,
    )
    yield daemon
    assert daemon.stop() == 0, daemon.log()


@pytest.fixture
def claude(daemon: Daemon) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=daemon.base_url, api_key="unused", max_retries=0, timeout=60) as client:
        yield client


@pytest.fixture
def oai(daemon: Daemon) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield client


def marker() -> str:
    return uuid.uuid4().hex[:10]


def user_texts(request: dict[str, Any]) -> list[str]:
    out = []
    for m in request["messages"]:
        if m["role"] != "user":
            continue
        content = m["content"]
        out.append(content if isinstance(content, str) else " ".join(p.get("text", "") for p in content))
    return out


def system_text(request: dict[str, Any]) -> str:
    return " ".join(m["content"] if isinstance(m["content"], str) else json.dumps(m["content"])
                    for m in request["messages"] if m["role"] == "system")


def text_of(message: Any) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


def test_anthropic_create_stream_and_stateless_resend(claude: anthropic.Anthropic, fake_llm: FakeLLMProcess) -> None:
    tag = marker()
    first_text = f"My name is Ada {tag}."
    first = claude.messages.with_raw_response.create(
        model="claude-opus-5-5", max_tokens=1024,
        system=[{"type": "text", "text": f"You are terse {tag}.", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": first_text}])
    message = first.parse()
    session = first.headers["x-session-id"]
    assert message.stop_reason == "end_turn" and text_of(message) and message.model == "claude-opus-5-5"
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    upstream = fake_llm.answer_requests(first_text)
    assert f"You are terse {tag}." in system_text(upstream[0])
    # Turn 2 resends the history, streamed: droid continues its session with only the new message.
    arrivals: list[float] = []
    started = time.monotonic()
    with claude.messages.stream(
        model="claude-opus-5-5", max_tokens=1024, system=f"You are terse {tag}.",
        messages=[{"role": "user", "content": first_text},
                  {"role": "assistant", "content": text_of(message)},
                  {"role": "user", "content": f"What is my name? {tag}"}],
    ) as stream:
        assert stream.response.headers["x-session-id"] == session
        for _ in stream.text_stream:
            arrivals.append(time.monotonic() - started)
        final = stream.get_final_message()
    assert final.stop_reason == "end_turn" and final.usage.output_tokens > 0
    assert len(arrivals) == fakellm.PACED_CHUNKS and arrivals[-1] - arrivals[0] > fakellm.PACE_S * 4
    upstream = fake_llm.answer_requests(f"What is my name? {tag}")
    assert upstream, "the second turn reached the LLM"
    texts = user_texts(upstream[-1])
    assert texts.count(first_text) == 1 and not any("<conversation>" in t for t in texts)


def test_anthropic_errors_in_anthropics_envelope(claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude.messages.create(model="no-such-model", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError) as bad:
        claude.messages.create(model=PACED, max_tokens=5, messages=[])
    assert bad.value.body["type"] == "error"  # type: ignore[index]
    with pytest.raises(anthropic.APIStatusError) as upstream:
        claude.messages.create(model="custom:fake-401", max_tokens=5,
                               messages=[{"role": "user", "content": f"x {marker()}"}])
    assert upstream.value.status_code == 502 and "401" in upstream.value.message


def test_langchain_anthropic_invoke_and_stream(daemon: Daemon) -> None:
    from langchain_anthropic import ChatAnthropic

    llm = ChatAnthropic(model="claude-opus-5-5", base_url=daemon.base_url, api_key="unused",  # type: ignore[call-arg]
                        max_retries=0, timeout=60, max_tokens=512)
    reply = llm.invoke(f"Say something {marker()}")
    assert isinstance(reply.content, str) and reply.content
    assert reply.usage_metadata is not None and reply.usage_metadata["output_tokens"] > 0
    chunks = list(llm.stream(f"Stream something {marker()}"))
    text = "".join(c.content if isinstance(c.content, str) else "".join(
        p.get("text", "") for p in c.content if isinstance(p, dict)) for c in chunks)
    assert len(chunks) >= 3 and text


def test_responses_instructions_and_previous_response_id(oai: openai.OpenAI, fake_llm: FakeLLMProcess) -> None:
    tag = marker()
    one = oai.responses.with_raw_response.create(model=PACED, instructions=f"Answer in haiku {tag}.",
                                                 input=f"remember {tag}")
    first = one.parse()
    assert first.status == "completed" and first.output_text
    upstream_one = fake_llm.answer_requests(f"remember {tag}")
    assert f"Answer in haiku {tag}." in system_text(upstream_one[0])
    stream = oai.responses.create(model=PACED, input=f"what did I say? {tag}", previous_response_id=first.id,
                                  stream=True)
    kinds, text = [], []
    completed: Any = None
    for event in stream:
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            text.append(event.delta)
        if event.type == "response.completed":
            completed = event.response
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert completed is not None and completed.output_text == "".join(text) and completed.usage.total_tokens > 0
    upstream = fake_llm.answer_requests(f"what did I say? {tag}")
    assert len(upstream) == 1
    texts = user_texts(upstream[0])
    # Turn 1 reached the LLM from droid's own session history; droid was given only the new input.
    assert texts.count(f"remember {tag}") == 1 and texts[-1] == f"what did I say? {tag}"
    assert not any("<conversation>" in t for t in texts)
    assistants = [m["content"] for m in upstream[0]["messages"] if m["role"] == "assistant"]
    assert assistants and assistants[-1].strip() == first.output_text.strip()
    assert oai.responses.retrieve(completed.id).output_text == completed.output_text


def test_a_chat_session_continues_in_anthropic_and_responses(
    oai: openai.OpenAI, claude: anthropic.Anthropic, fake_llm: FakeLLMProcess
) -> None:
    tag = marker()
    chat = oai.chat.completions.with_raw_response.create(model=PACED,
                                                        messages=[{"role": "user", "content": f"chat {tag}"}])
    session = chat.headers["x-session-id"]
    claude.messages.create(model=PACED, max_tokens=64, messages=[{"role": "user", "content": f"claude {tag}"}],
                           extra_headers={"X-Session-Id": session})
    oai.responses.create(model=PACED, input=f"responses {tag}", extra_headers={"X-Session-Id": session})
    texts = user_texts(fake_llm.answer_requests(f"responses {tag}")[0])
    assert [t for t in texts if tag in t] == [f"chat {tag}", f"claude {tag}", f"responses {tag}"]


@pytest.mark.parametrize("example", [
    ["stream_chat.py", PACED, "hello"],
    ["agent_session.py", "--model", PACED, "one", "two"],
    ["stream_messages.py", PACED, "hello"],
    ["responses_session.py", "--model", PACED, "--instructions", "Be brief.", "one", "two"],
])
def test_the_python_examples_work_as_documented(daemon: Daemon, example: list[str]) -> None:
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[2] / "examples" / example[0]
    result = subprocess.run([sys.executable, str(script), *example[1:]], capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "DROIDPOOL_URL": daemon.base_url}, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), result.stderr
