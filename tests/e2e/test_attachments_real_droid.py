"""Images, documents and structured output end to end: the official openai and anthropic SDKs and
langchain-anthropic → droidpool → the real droid CLI → the fake LLM, whose recorded requests show
what droid sent upstream.

What droid 0.225.2 does with them (/tmp/droidpool-notes/findings-17.md, tests/fixtures/rpc_attach_*):
an image reaches the LLM as an ``image_url`` data URL, re-encoded by droid (PNG stays PNG at the same
size, RGB becomes RGBA, so the bytes differ); a PDF as an OpenAI ``file`` part; a text document as an
``<attached-file>`` text part; a client tool result's image as droid's extra user message "Image
content from tool result:". Structured output goes to droid as ``outputFormat``: droid adds the
schema to the system prompt, checks the answer and asks twice more before it gives up.
"""

from __future__ import annotations

import base64
import json
import struct
import time
import uuid
from collections.abc import Iterator
from typing import Any, Literal

import anthropic
import openai
import pydantic
import pytest

from tests import media
from tests.conftest import Daemon, FakeLLMProcess, start_daemon, write_droid_home

pytestmark = pytest.mark.real_droid
VISION = "custom:fake-vision"
NO_IMAGE = "custom:fake-noimage"
JSON = "custom:fake-json"
VISION_TOOLS = "custom:fake-vision-tools"
MAX_IMAGE_BYTES = 20_000  # this daemon's [attachments] max_image_bytes
PARK_TIMEOUT_S = 120.0  # far longer than any test: a parked turn released early was released on purpose
STRUCTURED_MARK = "The user requested a structured final response."
RETRY_MARK = "did not satisfy the requested structured output contract"
TOOL_IMAGE_MARK = "Image content from tool result:"
# A valid 1×1 GIF: droid 0.225.2 fails the turn on GIF and WEBP, so droidpool refuses them up front.
GIF = (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00,"
       b"\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")


class Weather(pydantic.BaseModel):
    city: str
    temp: float


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, real_droid: str, fake_llm: FakeLLMProcess) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("attachments")
    home = write_droid_home(tmp / "home", fake_llm.url)
    daemon = start_daemon(tmp, {
        "droid": {"binary": real_droid, "home": str(home), "airgap": True},
        "pool": {"max_workers": 2, "models": [{"id": VISION}], "idle_min": 1},
        "attachments": {"max_image_bytes": MAX_IMAGE_BYTES},
        "tools": {"park_timeout_s": PARK_TIMEOUT_S},
        "deadlines": {"first_token_s": 20.0, "turn_s": 60.0},
    }, ready_timeout=60)
    yield daemon
    assert daemon.stop() == 0, daemon.log()


@pytest.fixture
def oai(daemon: Daemon) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield client


@pytest.fixture
def claude(daemon: Daemon) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=daemon.base_url, api_key="unused", max_retries=0, timeout=60) as client:
        yield client


def tag() -> str:
    return uuid.uuid4().hex[:10]


# --- what the fake LLM received ------------------------------------------------------------------


def parts(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message["content"]
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


def images_in(message: dict[str, Any]) -> list[str]:
    """The data URLs of a message's image_url parts."""
    return [p["image_url"]["url"] for p in parts(message) if p.get("type") == "image_url"]


def png_size(url: str) -> tuple[int, int]:
    """The width and height of a PNG data URL, after checking that it is a whole PNG."""
    head, _, data = url.partition(",")
    assert head == "data:image/png;base64", head
    raw = base64.b64decode(data, validate=True)
    assert raw.startswith(b"\x89PNG\r\n\x1a\n") and raw[12:16] == b"IHDR", raw[:16]
    assert raw[-8:-4] == b"IEND", "the PNG is complete"
    width, height = struct.unpack(">II", raw[16:24])
    return width, height


def system_prompt(request: dict[str, Any]) -> str:
    return "\n".join(p.get("text", "") for m in request["messages"] if m["role"] == "system" for p in parts(m))


def upstream(fake_llm: FakeLLMProcess, marker: str) -> list[dict[str, Any]]:
    return fake_llm.answer_requests(marker)


def session_of(daemon: Daemon, session_id: str) -> dict[str, Any]:
    status, body = daemon.get(f"/v1/sessions/{session_id}")
    assert status == 200, body
    return dict(body)


def usage_groups(daemon: Daemon, by: str) -> list[dict[str, Any]]:
    status, body = daemon.get(f"/v1/usage?by={by}")
    assert status == 200, body
    return list(body["groups"])


# --- 1. an image in OpenAI chat --------------------------------------------------------------


def test_chat_image_reaches_the_llm_as_png(oai: openai.OpenAI, fake_llm: FakeLLMProcess) -> None:
    marker = tag()
    text = f"What is in these pictures? {marker}"
    # The second is a PNG labelled JPEG: droidpool gives droid the type the bytes say (droid would
    # fail the turn with "SOI not found").
    answer = oai.chat.completions.create(model=VISION, messages=[{"role": "user", "content": [
        {"type": "text", "text": text},
        {"type": "image_url", "image_url": {"url": media.data_url(media.png(24, 12, seed=1))}},
        {"type": "image_url", "image_url": {"url": media.data_url(media.png(10, 30, seed=2), "image/jpeg"),
                                            "detail": "low"}},
    ]}])
    assert answer.choices[0].finish_reason == "stop" and text in (answer.choices[0].message.content or "")
    (request,) = upstream(fake_llm, marker)
    last = request["messages"][-1]
    assert last["role"] == "user"
    # droid re-encodes every image (RGB → RGBA PNG here): same size, other bytes.
    assert [png_size(url) for url in images_in(last)] == [(24, 12), (10, 30)]
    assert images_in(last)[0] != media.data_url(media.png(24, 12, seed=1))
    texts = [p["text"] for p in parts(last) if p["type"] == "text"]
    assert texts[-1] == text and "Attached image local file paths" in texts[0]
    assert parts(last)[0]["type"] == "image_url"  # droid's order: images, then the path note, then the text


# --- 2. structured output through Chat Completions --------------------------------------------


def test_chat_parse_gives_the_pydantic_model(oai: openai.OpenAI, fake_llm: FakeLLMProcess) -> None:
    marker = tag()
    completion = oai.chat.completions.parse(model=JSON, response_format=Weather,
                                            messages=[{"role": "user", "content": f"Weather in Oslo? {marker}"}])
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Weather) and parsed == Weather(city="sample", temp=1.5)  # built from the schema
    (request,) = upstream(fake_llm, marker)
    prompt = system_prompt(request)
    assert STRUCTURED_MARK in prompt
    schema = json.loads(prompt.rsplit("matching this JSON Schema:\n", 1)[1].strip())
    assert schema["properties"].keys() == {"city", "temp"} and schema["required"] == ["city", "temp"]
    assert request["response_format"] is None  # droid asks in the prompt, never with response_format
    # json_object: any JSON object, droid's {"type": "object"}.
    marker = tag()
    loose = oai.chat.completions.create(model=JSON, response_format={"type": "json_object"},
                                        messages=[{"role": "user", "content": f"Any JSON {marker}"}])
    assert isinstance(json.loads(loose.choices[0].message.content or ""), dict)
    assert system_prompt(upstream(fake_llm, marker)[0]).endswith('matching this JSON Schema:\n{"type":"object"}')


def test_chat_stream_shows_only_the_accepted_structured_answer(oai: openai.OpenAI, fake_llm: FakeLLMProcess) -> None:
    marker = tag()
    accepted = '{"city": "Paris", "temp": 21.5}'
    rejected = "not json, sorry"
    deltas: list[str] = []
    finish = None
    with oai.chat.completions.create(
        model=JSON, stream=True, messages=[{"role": "user", "content": f"W {marker} [[attempts:{rejected}||{accepted}]]"}],
        response_format={"type": "json_schema", "json_schema": {"name": "weather", "strict": True,
                                                                "schema": Weather.model_json_schema()}},
    ) as stream:
        for chunk in stream:
            if chunk.choices:
                deltas.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
    assert "".join(deltas) == accepted and finish == "stop"
    assert not any("sorry" in d for d in deltas)
    first, retry = upstream(fake_llm, marker)  # droid asked again, with its retry message
    assert RETRY_MARK not in json.dumps(first["messages"]) and RETRY_MARK in json.dumps(retry["messages"])


class City(pydantic.BaseModel):
    name: str
    country: Literal["FR", "NO"]


class Trip(pydantic.BaseModel):
    cities: list[City]
    note: str | None


def test_a_nested_model_is_checked_by_droid_through_its_refs(oai: openai.OpenAI, fake_llm: FakeLLMProcess) -> None:
    marker = tag()
    wrong = '{"cities": [{"name": "Paris", "country": "XX"}], "note": null}'
    right = '{"cities": [{"name": "Oslo", "country": "NO"}], "note": null}'
    completion = oai.chat.completions.parse(model=JSON, response_format=Trip, messages=[
        {"role": "user", "content": f"Plan {marker} [[attempts:{wrong}||{right}]]"}])
    assert completion.choices[0].message.parsed == Trip(cities=[City(name="Oslo", country="NO")], note=None)
    first, retry = upstream(fake_llm, marker)
    assert '"$ref":"#/$defs/City"' in system_prompt(first)  # the schema went to droid whole
    # droid followed the $ref to find the wrong country.
    assert "/cities/0/country must be equal to one of the allowed values" in system_prompt(retry)


def test_a_structured_answer_that_never_fits_is_an_error_in_every_dialect(
    oai: openai.OpenAI, claude: anthropic.Anthropic, fake_llm: FakeLLMProcess
) -> None:
    schema: Any = Weather.model_json_schema()
    marker = tag()
    with pytest.raises(openai.APIStatusError) as chat:
        oai.chat.completions.create(model=JSON, messages=[{"role": "user", "content": f"W {marker} [[json:nope]]"}],
                                    response_format={"type": "json_schema",
                                                     "json_schema": {"name": "w", "schema": schema}})
    assert chat.value.status_code == 502
    assert chat.value.body["code"] == "structured_output_invalid"  # type: ignore[index]
    assert chat.value.body["type"] == "upstream_error"  # type: ignore[index]
    assert "JSON Parse error" in chat.value.message  # droid's own words
    assert len(upstream(fake_llm, marker)) == 3  # the answer and droid's two retries
    with pytest.raises(openai.APIStatusError) as responses:
        oai.responses.create(model=JSON, input=f"W {tag()} [[json:nope]]",
                             text={"format": {"type": "json_schema", "name": "w", "schema": schema}})
    assert responses.value.status_code == 502
    assert responses.value.body["code"] == "structured_output_invalid"  # type: ignore[index]
    with pytest.raises(anthropic.APIStatusError) as messages:
        claude.messages.create(model=JSON, max_tokens=256, messages=[{"role": "user", "content": f"W {tag()} [[json:nope]]"}],
                               output_config={"format": {"type": "json_schema", "schema": schema}})
    # Anthropic's envelope has no code: its type and message say it.
    assert messages.value.status_code == 502
    assert messages.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    assert "did not match the requested JSON schema" in messages.value.message
    # Streamed, the Responses API names the code in response.failed.
    with oai.responses.create(model=JSON, input=f"W {tag()} [[json:nope]]", stream=True,
                              text={"format": {"type": "json_schema", "name": "w", "schema": schema}}) as stream:
        events = list(stream)
    failed: Any = events[-1]
    assert failed.type == "response.failed" and failed.response.error.code == "structured_output_invalid"
    assert not any(e.type == "response.output_text.delta" for e in events)


# --- 3. the Responses API ----------------------------------------------------------------------


def test_responses_input_image_file_and_parse(oai: openai.OpenAI, fake_llm: FakeLLMProcess) -> None:
    marker = tag()
    text = f"Describe both {marker}"
    response = oai.responses.create(model=VISION, input=[{"role": "user", "content": [
        {"type": "input_text", "text": text},
        {"type": "input_image", "image_url": media.data_url(media.png(33, 17, seed=3)), "detail": "auto"},
        {"type": "input_file", "filename": "report.pdf",
         "file_data": "data:application/pdf;base64," + media.b64(media.pdf(f"Report {marker}"))},
        # Text files: bare base64 typed by the file name, or a data URL; droid takes them as text/plain.
        {"type": "input_file", "filename": "notes.md", "file_data": media.b64(b"# Notes\nbody")},
        {"type": "input_file", "filename": "data.csv", "file_data": "data:text/csv;base64," + media.b64(b"a,b\n1,2")},
    ]}])
    assert response.status == "completed" and text in response.output_text
    (request,) = upstream(fake_llm, marker)
    last = request["messages"][-1]
    assert [png_size(url) for url in images_in(last)] == [(33, 17)]
    (document,) = [p["file"] for p in parts(last) if p["type"] == "file"]
    assert document["filename"] == "report.pdf"
    assert base64.b64decode(document["file_data"].removeprefix("data:application/pdf;base64,")) == \
        media.pdf(f"Report {marker}")  # droid passes PDFs through as they are
    texts = [p["text"] for p in parts(last) if p["type"] == "text"]
    assert texts[:2] == ['<attached-file name="notes.md" type="text/plain">\n# Notes\nbody\n</attached-file>',
                         '<attached-file name="data.csv" type="text/plain">\na,b\n1,2\n</attached-file>']
    assert texts[-1] == text
    marker = tag()
    parsed = oai.responses.parse(model=JSON, input=f"Weather in Rome? {marker}", text_format=Weather)
    assert parsed.output_parsed == Weather(city="sample", temp=1.5)
    assert STRUCTURED_MARK in system_prompt(upstream(fake_llm, marker)[0])


# --- 4. Anthropic Messages ----------------------------------------------------------------------


def test_anthropic_image_pdf_and_text_documents(claude: anthropic.Anthropic, fake_llm: FakeLLMProcess) -> None:
    marker = tag()
    text = f"Compare them {marker}"
    message = claude.messages.create(model=VISION, max_tokens=256, messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": media.b64(media.png(20, 10, seed=4))}},
        {"type": "document", "title": "doc.pdf",
         "source": {"type": "base64", "media_type": "application/pdf", "data": media.b64(media.pdf())}},
        {"type": "document", "title": "notes.txt", "source": {"type": "text", "media_type": "text/plain",
                                                              "data": f"plain notes {marker}"}},
        {"type": "text", "text": text},
    ]}])
    assert message.stop_reason == "end_turn"
    (request,) = upstream(fake_llm, marker)
    last = parts(request["messages"][-1])
    # droid's order: images, PDFs, text documents, the image path note, the user's text.
    assert [p["type"] for p in last] == ["image_url", "file", "text", "text", "text"]
    assert png_size(last[0]["image_url"]["url"]) == (20, 10)
    assert last[1]["file"]["filename"] == "doc.pdf"
    assert last[1]["file"]["file_data"] == "data:application/pdf;base64," + media.b64(media.pdf())
    assert last[2]["text"].startswith('<attached-file name="notes.txt" type="text/plain">')
    assert f"plain notes {marker}" in last[2]["text"]
    assert last[4]["text"] == text


def test_anthropic_image_in_a_client_tool_result(claude: anthropic.Anthropic, fake_llm: FakeLLMProcess) -> None:
    tools: Any = [{"name": "screenshot", "description": "A screenshot of the screen.",
                   "input_schema": {"type": "object", "properties": {"what": {"type": "string"}}}}]
    marker = tag()
    messages: list[Any] = [{"role": "user", "content": f'Look {marker} [[call:screenshot:{{"what": "screen"}}]]'}]
    first = claude.messages.create(model=VISION_TOOLS, max_tokens=256, messages=messages, tools=tools)
    assert first.stop_reason == "tool_use"
    (use,) = [b for b in first.content if b.type == "tool_use"]
    assert use.name == "screenshot" and use.input == {"what": "screen"}
    messages += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": [
                     {"type": "text", "text": f"the screen {marker}"},
                     {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                  "data": media.b64(media.png(30, 20, seed=5))}}]}]}]
    second = claude.messages.create(model=VISION_TOOLS, max_tokens=256, messages=messages, tools=tools)
    assert second.stop_reason == "end_turn"
    assert "".join(b.text for b in second.content if b.type == "text") == f"Tool said: the screen {marker} [+1 image(s)]"
    sent = upstream(fake_llm, marker)[-1]["messages"]
    assert [m["role"] for m in sent[-3:]] == ["assistant", "tool", "user"]
    assert sent[-2]["content"] == f"the screen {marker}" and sent[-2]["tool_call_id"] == sent[-3]["tool_calls"][0]["id"]
    assert parts(sent[-1])[0] == {"type": "text", "text": TOOL_IMAGE_MARK}
    assert [png_size(url) for url in images_in(sent[-1])] == [(30, 20)]


def test_anthropic_output_config_format_gives_json(claude: anthropic.Anthropic, fake_llm: FakeLLMProcess) -> None:
    marker = tag()
    schema: Any = {**Weather.model_json_schema(), "additionalProperties": False}
    message = claude.messages.create(model=JSON, max_tokens=256,
                                     messages=[{"role": "user", "content": f"Weather? {marker}"}],
                                     output_config={"format": {"type": "json_schema", "schema": schema}})
    (block,) = message.content
    assert block.type == "text" and json.loads(block.text) == {"city": "sample", "temp": 1.5}
    assert STRUCTURED_MARK in system_prompt(upstream(fake_llm, marker)[0])
    # The SDK's own helper (output_format=<pydantic model>) sends the same thing.
    parsed = claude.messages.parse(model=JSON, max_tokens=256, output_format=Weather,
                                   messages=[{"role": "user", "content": f"Weather again? {tag()}"}])
    assert parsed.parsed_output == Weather(city="sample", temp=1.5)
    # Streamed, an answer droid rejects never reaches the client: only the one it accepts.
    accepted = '{"city": "Bern", "temp": 9}'
    with claude.messages.stream(model=JSON, max_tokens=256, output_config={"format": {"type": "json_schema",
                                                                                      "schema": schema}},
                                messages=[{"role": "user", "content": f"W {tag()} [[attempts:{{}}||{accepted}]]"}]
                                ) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == accepted and final.stop_reason == "end_turn"


# --- 5. LangChain ---------------------------------------------------------------------------------


def test_langchain_anthropic_with_structured_output(daemon: Daemon, fake_llm: FakeLLMProcess) -> None:
    from langchain_anthropic import ChatAnthropic

    llm = ChatAnthropic(model=JSON, base_url=daemon.base_url, api_key="unused",  # type: ignore[call-arg,arg-type]
                        max_retries=0, timeout=60, max_tokens=512)
    marker = tag()
    structured = llm.with_structured_output(Weather, method="json_schema")  # output_config.format
    answer = structured.invoke(f'Weather in Lima? {marker} [[json:{{"city": "Lima", "temp": 19}}]]')
    assert answer == Weather(city="Lima", temp=19)
    assert STRUCTURED_MARK in system_prompt(upstream(fake_llm, marker)[0])
    # LangChain's default method forces a tool call (tool_choice "tool"): droid cannot force one,
    # so droidpool says so rather than answer without the tool.
    with pytest.raises(anthropic.BadRequestError) as forced:
        llm.with_structured_output(Weather).invoke(f"Weather? {tag()}")
    assert "tool_choice" in str(forced.value)


# --- 6. a follow-up after an image -----------------------------------------------------------------


def test_a_stateless_follow_up_does_not_resend_the_image(
    oai: openai.OpenAI, daemon: Daemon, fake_llm: FakeLLMProcess
) -> None:
    marker = tag()
    picture = media.png(16, 8, seed=6)
    messages: list[Any] = [{"role": "user", "content": [
        {"type": "text", "text": f"What is this? {marker}"},
        {"type": "image_url", "image_url": {"url": media.data_url(picture)}}]}]
    first = oai.chat.completions.with_raw_response.create(model=VISION, messages=messages)
    session = first.headers["x-session-id"]
    messages += [{"role": "assistant", "content": first.parse().choices[0].message.content},
                 {"role": "user", "content": f"And its colour? {marker}"}]
    second = oai.chat.completions.with_raw_response.create(model=VISION, messages=messages)
    assert second.headers["x-session-id"] == session
    assert session_of(daemon, session)["turns"] == 2
    # The ledger: the two turns sent droid one image between them, so the follow-up sent none.
    (row,) = [g for g in usage_groups(daemon, "session") if g["session"] == session]
    assert row["turns"] == 2 and row["attachments"] == 1 and row["attachment_bytes"] == len(picture)
    # droid re-sends the image from its own history: once, not twice.
    follow_up = upstream(fake_llm, f"And its colour? {marker}")[-1]["messages"]
    assert sum(len(images_in(m)) for m in follow_up) == 1
    assert [m["role"] for m in follow_up][-3:] == ["user", "assistant", "user"]
    assert parts(follow_up[-1]) == [{"type": "text", "text": f"And its colour? {marker}"}]


# --- 7. what droidpool refuses before droid sees it ---------------------------------------------------


def inline(media_type: str, data: str) -> tuple[str, dict[str, str]]:
    """An image as a data URL (OpenAI) and as an Anthropic base64 source."""
    return f"data:{media_type};base64,{data}", {"type": "base64", "media_type": media_type, "data": data}


WEB_IMAGE = "https://example.com/plot.png"
# name → (model, (data URL, Anthropic source), error code)
BAD_IMAGES = {
    "too_large": (VISION, inline("image/png", media.b64(media.png_of_size(2 * MAX_IMAGE_BYTES))),
                  "attachment_too_large"),
    "gif": (VISION, inline("image/gif", media.b64(GIF)), "unsupported_attachment"),
    "no_image_model": (NO_IMAGE, inline("image/png", media.b64(media.png(8, 8))), "model_no_image_support"),
    "corrupt_base64": (VISION, inline("image/png", "this is not base64!!"), "invalid_attachment"),
    "truncated_png": (VISION, inline("image/png", media.b64(media.png(16, 16)[:60])), "corrupt_attachment"),
    # [attachments] fetch_urls is off (the default): droidpool fetches nothing for a client.
    "web_url": (VISION, (WEB_IMAGE, {"type": "url", "url": WEB_IMAGE}), "invalid_attachment"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_a_bad_image_is_a_400_naming_the_part_in_every_dialect(
    case: str, oai: openai.OpenAI, claude: anthropic.Anthropic, fake_llm: FakeLLMProcess
) -> None:
    model, (url, source), code = BAD_IMAGES[case]
    image: Any = {"type": "image", "source": source}
    marker = tag()
    with pytest.raises(openai.BadRequestError) as chat:
        oai.chat.completions.create(model=model, messages=[{"role": "user", "content": [
            {"type": "text", "text": f"look {marker}"}, {"type": "image_url", "image_url": {"url": url}}]}])
    assert chat.value.body["param"] == "messages[0].content[1].image_url"  # type: ignore[index]
    assert chat.value.body["code"] == code and chat.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as responses:
        oai.responses.create(model=model, input=[{"role": "user", "content": [
            {"type": "input_text", "text": f"look {marker}"}, {"type": "input_image", "image_url": url,
                                                                "detail": "auto"}]}])
    assert responses.value.body["param"] == "input[0].content[1]"  # type: ignore[index]
    assert responses.value.body["code"] == code  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError) as messages:
        claude.messages.create(model=model, max_tokens=64, messages=[{"role": "user", "content": [
            {"type": "text", "text": f"look {marker}"}, image]}])
    # Anthropic's envelope has no param: the message starts with the part's path.
    assert messages.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert messages.value.body["error"]["message"].startswith("messages[0].content[1]: ")  # type: ignore[index]
    assert upstream(fake_llm, marker) == []  # nothing reached the LLM


def test_a_schema_that_is_not_json_schema_is_a_400_in_every_dialect(
    oai: openai.OpenAI, claude: anthropic.Anthropic, fake_llm: FakeLLMProcess
) -> None:
    bad: Any = {"type": "object", "properties": {"city": {"type": "town"}}, "required": "city"}
    marker = tag()
    with pytest.raises(openai.BadRequestError) as chat:
        oai.chat.completions.create(model=JSON, messages=[{"role": "user", "content": f"W {marker}"}],
                                    response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": bad}})
    assert chat.value.body["param"] == "response_format.json_schema.schema"  # type: ignore[index]
    assert chat.value.body["code"] == "invalid_schema"  # type: ignore[index]
    assert "/properties/city" in chat.value.message
    with pytest.raises(openai.BadRequestError) as responses:
        oai.responses.create(model=JSON, input=f"W {marker}",
                             text={"format": {"type": "json_schema", "name": "w", "schema": bad}})
    assert responses.value.body["param"] == "text.format.schema"  # type: ignore[index]
    assert responses.value.body["code"] == "invalid_schema"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError) as messages:
        claude.messages.create(model=JSON, max_tokens=64, messages=[{"role": "user", "content": f"W {marker}"}],
                               output_config={"format": {"type": "json_schema", "schema": bad}})
    assert messages.value.body["error"]["message"].startswith("output_config.format.schema: ")  # type: ignore[index]
    # A schema whose root is not an object: droid only gives JSON objects.
    with pytest.raises(openai.BadRequestError) as array:
        oai.chat.completions.create(model=JSON, messages=[{"role": "user", "content": f"W {marker}"}],
                                    response_format={"type": "json_schema", "json_schema": {
                                        "name": "w", "schema": {"type": "array", "items": {"type": "string"}}}})
    assert array.value.body["code"] == "invalid_schema"  # type: ignore[index]
    assert upstream(fake_llm, marker) == []


# --- 8. a parked turn whose results droidpool cannot take ---------------------------------------------

SCREENSHOT_CHAT: Any = {"type": "function", "function": {
    "name": "screenshot", "description": "A screenshot.", "parameters": {"type": "object", "properties": {}}}}
SCREENSHOT_ANTHROPIC: Any = {"name": "screenshot", "description": "A screenshot.",
                        "input_schema": {"type": "object", "properties": {}}}
SCREENSHOT_RESPONSES: Any = {"type": "function", "name": "screenshot", "description": "A screenshot.",
                        "parameters": {"type": "object", "properties": {}}}


def parked(daemon: Daemon) -> int:
    status, body = daemon.get("/readyz")
    assert status == 200, body
    return int(body["client_tools"]["parked"])


def ask_for_a_screenshot(dialect: str, oai: openai.OpenAI, claude: anthropic.Anthropic, marker: str,
                         result_image: dict[str, str]) -> tuple[str, Any, Any]:
    """The first turn (the LLM calls the client's tool), then a function to send back a result
    holding text and ``result_image``; returns (session, send, the param the image is at)."""
    ask = f"Screen {marker} [[call:screenshot:{{}}]]"
    if dialect == "openai":
        messages: list[Any] = [{"role": "user", "content": ask}]
        raw = oai.chat.completions.with_raw_response.create(model=VISION_TOOLS, messages=messages,
                                                            tools=[SCREENSHOT_CHAT])
        message = raw.parse().choices[0].message
        (call,) = message.tool_calls or []
        messages += [message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": [
            {"type": "text", "text": f"shot {marker}"},
            {"type": "image_url", "image_url": {"url": f"data:{result_image['type']};base64,{result_image['data']}"}}]}]
        return raw.headers["x-session-id"], lambda: oai.chat.completions.with_raw_response.create(
            model=VISION_TOOLS, messages=messages, tools=[SCREENSHOT_CHAT]), "messages[2].content[1].image_url"
    if dialect == "anthropic":
        history: list[Any] = [{"role": "user", "content": ask}]
        raw_message = claude.messages.with_raw_response.create(model=VISION_TOOLS, max_tokens=256, messages=history,
                                                               tools=[SCREENSHOT_ANTHROPIC])
        first = raw_message.parse()
        (use,) = [b for b in first.content if b.type == "tool_use"]
        history += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": [
                        {"type": "text", "text": f"shot {marker}"},
                        {"type": "image", "source": {"type": "base64", "media_type": result_image["type"],
                                                     "data": result_image["data"]}}]}]}]
        return raw_message.headers["x-session-id"], lambda: claude.messages.with_raw_response.create(
            model=VISION_TOOLS, max_tokens=256, messages=history, tools=[SCREENSHOT_ANTHROPIC]), \
            "messages[2].content[0].content[1]"
    raw_response = oai.responses.with_raw_response.create(model=VISION_TOOLS, input=ask,
                                                          tools=[SCREENSHOT_RESPONSES])
    response = raw_response.parse()
    (call_item,) = [i for i in response.output if i.type == "function_call"]
    output: Any = [{"type": "function_call_output", "call_id": call_item.call_id, "output": [
        {"type": "input_text", "text": f"shot {marker}"},
        {"type": "input_image", "image_url": f"data:{result_image['type']};base64,{result_image['data']}"}]}]
    return raw_response.headers["x-session-id"], lambda: oai.responses.with_raw_response.create(
        model=VISION_TOOLS, input=output, previous_response_id=response.id, tools=[SCREENSHOT_RESPONSES]), \
        "input[0].output[1]"


@pytest.mark.parametrize("dialect", ["openai", "anthropic", "responses"])
def test_results_droidpool_cannot_take_release_the_parked_turn_at_once(
    dialect: str, oai: openai.OpenAI, claude: anthropic.Anthropic, daemon: Daemon, fake_llm: FakeLLMProcess
) -> None:
    marker = tag()
    session, send, where = ask_for_a_screenshot(dialect, oai, claude, marker,
                                                {"type": "image/gif", "data": media.b64(GIF)})
    assert parked(daemon) == 1
    asked = len(upstream(fake_llm, marker))
    started = time.monotonic()
    with pytest.raises((openai.BadRequestError, anthropic.BadRequestError)) as refused:
        send()
    assert time.monotonic() - started < 10  # not the park timeout (120 s)
    body: Any = getattr(refused.value, "body", None)
    if dialect == "anthropic":
        assert body["error"]["message"].startswith(f"{where}: droid takes PNG and JPEG images only")
    else:
        assert body["param"] == where and body["code"] == "unsupported_attachment"
    assert parked(daemon) == 0  # released now, not when the park times out
    assert len(upstream(fake_llm, marker)) == asked  # the LLM saw nothing of the refused results
    assert f'"session": "{session}", "why": "{where}: droid takes PNG' in daemon.log()  # turn.resume_refused
    assert session_of(daemon, session)["failed_turns"] == 1
    # The ledger: the parked turn's row, and one of its own for how it ended, with what droid spent.
    rows = {g["status"]: g for g in usage_groups(daemon, "session,status") if g["session"] == session}
    assert rows.keys() == {"completed", "resume_refused"}, rows
    assert rows["resume_refused"]["turns"] == 1 and rows["resume_refused"]["attachments"] == 0
    spent = session_of(daemon, session)["usage"]
    assert sum(r["input_tokens"] for r in rows.values()) == spent["input_tokens"] > 0
    assert sum(r["output_tokens"] for r in rows.values()) == spent["output_tokens"] > 0
