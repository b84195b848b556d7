"""End to end through the official openai SDK: droidpool → the real droid CLI → the fake LLM."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests import fakellm
from tests.conftest import (
    Daemon,
    FakeLLMProcess,
    descendants,
    start_daemon,
    wait_until,
    write_droid_home,
)

pytestmark = pytest.mark.real_droid


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, real_droid: str, fake_llm: FakeLLMProcess) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("e2e")
    home = write_droid_home(tmp / "home", fake_llm.url)
    daemon = start_daemon(
        tmp,
        {
            "droid": {"binary": real_droid, "home": str(home), "airgap": True},
            "pool": {"max_workers": 4, "models": [{"id": "custom:fake-paced"}], "idle_min": 1},
            "deadlines": {"first_token_s": 20.0, "turn_s": 60.0},
        },
        ready_timeout=60,
    )
    yield daemon
    pids = descendants(daemon.process.pid)
    assert daemon.stop() == 0, daemon.log()
    # No droid worker outlives the daemon.
    wait_until(lambda: not [p for p in pids if Path(f"/proc/{p}").exists() and _not_zombie(p)], 10, "workers to exit")


def _not_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def client(daemon: Daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def marker() -> str:
    return uuid.uuid4().hex[:10]


def user_texts(request: dict[str, Any]) -> list[str]:
    return [m["content"] for m in request["messages"] if m["role"] == "user" and isinstance(m["content"], str)]


def test_streams_content_chunks_as_the_llm_paces_them(client: openai.OpenAI) -> None:
    tag = marker()
    started = time.monotonic()
    arrivals: list[float] = []
    pieces: list[str] = []
    stream = client.chat.completions.create(
        model="custom:fake-paced",
        messages=[{"role": "user", "content": f"Tell me a story {tag}"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    roles, finish, usage = [], [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        if choice.delta.role:
            roles.append(choice.delta.role)
        if choice.delta.content:
            arrivals.append(time.monotonic() - started)
            pieces.append(choice.delta.content)
        if choice.finish_reason:
            finish.append(choice.finish_reason)
    assert roles == ["assistant"]
    assert finish == ["stop"]
    assert len(pieces) == fakellm.PACED_CHUNKS
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    # Token by token as the LLM sends them, not buffered: most gaps near the LLM's pace.
    assert sum(gap > fakellm.PACE_S * 0.5 for gap in gaps) >= len(gaps) - 2, gaps
    assert arrivals[-1] - arrivals[0] > fakellm.PACE_S * (fakellm.PACED_CHUNKS - 3)
    assert usage is not None and usage.completion_tokens > 0 and usage.prompt_tokens > 0


def test_new_conversations_cost_no_title_request_upstream(client: openai.OpenAI, fake_llm: FakeLLMProcess) -> None:
    """droidpool names sessions itself (droid.rename_session at init): droid then skips the
    extra LLM call it otherwise makes on a session's first turn to generate a title."""
    tag = marker()
    client.chat.completions.create(model="custom:fake-paced", messages=[{"role": "user", "content": f"title? {tag}"}])
    seen = [r for r in fake_llm.requests() if tag in json.dumps(r["messages"])]
    assert [r["title"] for r in seen] == [False]


def test_stateless_resend_continues_the_same_droid_session(client: openai.OpenAI, fake_llm: FakeLLMProcess) -> None:
    tag = marker()
    first_text = f"My name is Alice {tag}."
    messages: list[Any] = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": first_text},
    ]
    first = client.chat.completions.with_raw_response.create(model="custom:fake-paced", messages=messages)
    session = first.headers["x-session-id"]
    answer = first.parse().choices[0].message.content
    assert answer
    # Clients reformat what they resend: content parts instead of a string, padding.
    messages[1] = {"role": "user", "content": [{"type": "text", "text": f"  {first_text}\n"}]}
    messages += [{"role": "assistant", "content": answer + " "}, {"role": "user", "content": f"What is my name? {tag}"}]
    second = client.chat.completions.with_raw_response.create(model="custom:fake-paced", messages=messages)
    assert second.headers["x-session-id"] == session
    upstream = fake_llm.answer_requests(f"What is my name? {tag}")
    assert len(upstream) == 1
    texts = user_texts(upstream[0])
    # droid's own session history carries turn 1; it was not re-sent as a transcript.
    assert texts.count(first_text) == 1
    assert texts[-1] == f"What is my name? {tag}"
    assert not any("<conversation>" in t for t in texts)
    assistants = [m["content"] for m in upstream[0]["messages"] if m["role"] == "assistant"]
    assert assistants and assistants[-1].strip() == answer.strip()


def test_session_id_header_continues_with_only_the_new_message(client: openai.OpenAI, fake_llm: FakeLLMProcess) -> None:
    tag = marker()
    first = client.chat.completions.with_raw_response.create(
        model="custom:fake-paced", messages=[{"role": "user", "content": f"Remember {tag}"}]
    )
    session = first.headers["x-session-id"]
    stream = client.chat.completions.with_raw_response.create(
        model="custom:fake-paced",
        messages=[{"role": "user", "content": f"What did I ask you to remember? {tag}"}],
        stream=True,
        extra_headers={"X-Session-Id": session},
    )
    assert stream.headers["x-session-id"] == session
    text = "".join(c.choices[0].delta.content or "" for c in stream.parse() if c.choices)
    assert text
    upstream = fake_llm.answer_requests(f"What did I ask you to remember? {tag}")
    assert len(upstream) == 1
    assert f"Remember {tag}" in user_texts(upstream[0])
    # And by body field, a third turn sees both earlier ones.
    client.chat.completions.create(
        model="custom:fake-paced",
        messages=[{"role": "user", "content": f"third {tag}"}],
        extra_body={"session_id": session},
    )
    third = fake_llm.answer_requests(f"third {tag}")
    assert {f"Remember {tag}", f"What did I ask you to remember? {tag}"} <= set(user_texts(third[0]))


def test_unknown_history_starts_a_session_with_a_delimited_transcript(client: openai.OpenAI, fake_llm: FakeLLMProcess) -> None:
    tag = marker()
    client.chat.completions.create(
        model="custom:fake-paced",
        messages=[
            {"role": "user", "content": f"earlier question {tag}"},
            {"role": "assistant", "content": "earlier answer"},
            {"role": "user", "content": f"new question {tag}"},
        ],
    )
    upstream = fake_llm.answer_requests(f"new question {tag}")
    assert len(upstream) == 1
    last = user_texts(upstream[0])[-1]
    assert "<conversation>" in last and f"earlier question {tag}" in last and "earlier answer" in last
    assert last.rstrip().endswith(f"new question {tag}")


def test_new_conversations_are_isolated(client: openai.OpenAI, fake_llm: FakeLLMProcess) -> None:
    secret, other = marker(), marker()
    client.chat.completions.create(model="custom:fake-paced", messages=[{"role": "user", "content": f"secret {secret}"}])
    client.chat.completions.create(model="custom:fake-paced", messages=[{"role": "user", "content": f"hello {other}"}])
    upstream = fake_llm.answer_requests(f"hello {other}")
    assert upstream and not any(secret in str(m) for m in upstream[0]["messages"])


def test_reasoning_deltas_arrive_as_reasoning_content(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="custom:fake-reasoning",
        messages=[{"role": "user", "content": f"think {marker()}"}],
        stream=True,
    )
    reasoning, content = [], []
    for chunk in stream:
        if chunk.choices:
            delta = chunk.choices[0].delta
            reasoning.append((delta.model_extra or {}).get("reasoning_content") or "")
            content.append(delta.content or "")
    assert "".join(reasoning) == "Weighing the question."
    assert "".join(content).strip()


def test_model_switch_inside_a_session_keeps_context(client: openai.OpenAI, fake_llm: FakeLLMProcess) -> None:
    tag = marker()
    first = client.chat.completions.with_raw_response.create(
        model="custom:fake-paced", messages=[{"role": "user", "content": f"fact {tag}"}]
    )
    session = first.headers["x-session-id"]
    echo = client.chat.completions.create(
        model="custom:fake-echo",
        messages=[{"role": "user", "content": f"recall {tag}"}],
        extra_headers={"X-Session-Id": session},
    )
    upstream = fake_llm.answer_requests(f"recall {tag}")
    assert upstream[0]["scenario"] == "echo"
    assert f"fact {tag}" in user_texts(upstream[0])
    assert (echo.choices[0].message.content or "").startswith("ECHO")


def test_errors_use_the_openai_envelope(client: openai.OpenAI, daemon: Daemon) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(
            model="custom:fake-paced",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"X-Session-Id": "00000000-0000-0000-0000-000000000000"},
        )
    assert missing.value.code == "session_not_found"
    with pytest.raises(openai.NotFoundError) as no_model:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert no_model.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="custom:fake-paced", messages=[{"role": "user", "content": "hi"}], n=2)
    assert bad.value.param == "n"
    # The upstream refuses droid's key: a 502 naming droid's reason, not a hang.
    with pytest.raises(openai.APIStatusError) as upstream:
        client.chat.completions.create(model="custom:fake-401", messages=[{"role": "user", "content": f"x {marker()}"}])
    assert upstream.value.status_code == 502
    assert "401" in upstream.value.message


def test_a_byok_model_answers_by_its_settings_name_and_droids_id(client: openai.OpenAI, fake_llm: FakeLLMProcess) -> None:
    ids = {m.id for m in client.models.list()}
    assert "custom:Fake-Named-0" in ids  # what droid lists
    for name in ("custom:fake-named", "custom:Fake-Named-0"):
        tag = marker()
        answer = client.chat.completions.create(model=name, messages=[{"role": "user", "content": f"named {tag}"}])
        assert (answer.choices[0].message.content or "").startswith("ECHO")
        assert fake_llm.answer_requests(f"named {tag}")[0]["scenario"] == "echo"


def test_models_and_health(daemon: Daemon, client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert "custom:fake-paced" in ids
    assert daemon.get("/healthz") == (200, {"status": "ok"})
    status, body = daemon.get("/readyz")
    assert status == 200 and body["ready"] is True
