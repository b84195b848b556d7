"""Images, documents and structured output: reading them in every dialect, checking them, digests,
and what droid is given."""

from __future__ import annotations

import base64
import types
from typing import Any

import pytest

from droidpool import errors
from droidpool.api import anthropic, openai_chat, responses
from droidpool.core import attachments, conversation, structured
from droidpool.core.attachments import Limits, check, decoded, from_base64, from_text, from_url
from droidpool.core.model import Attachment, Message, Text, ToolResult, TurnRequest
from droidpool.core.tools import mcp_content
from tests.media import b64, data_url, pdf, png

PNG = png()
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00\xff\xd9"


def refused(items: list[Attachment], limits: Limits | None = None, sees_images: bool = True) -> errors.InvalidRequest:
    with pytest.raises(errors.InvalidRequest) as info:
        check(items, limits or Limits(), model="m", sees_images=sees_images)
    return info.value


# --- reading ---------------------------------------------------------------------------------------


def test_base64_is_decoded_and_known_by_its_bytes() -> None:
    wrapped = "\n".join(b64(PNG)[i:i + 60] for i in range(0, len(b64(PNG)), 60))  # MIME wraps lines
    a = from_base64("image", "image/PNG", wrapped, where="x")
    assert a.data == b"" and a.size == len(PNG)  # decoded only when it goes to droid
    assert decoded(a).data == PNG and a.media_type == "image/png" and a.problem is None
    assert a.sha256 == from_url("image", data_url(PNG), where="y").sha256
    # known by the hash of its base64: the same whether the bytes came inline or decoded
    assert a.sha256 == Attachment("image", "image/png", PNG).sha256


def test_unreadable_parts_are_kept_with_their_problem() -> None:
    assert decoded(from_base64("image", "image/png", "not base64!!", where="w")).problem == "its base64 data is corrupt"
    assert from_base64("image", "image/png", 5, where="w").problem == "its data must be a base64 string"
    assert from_url("image", "data:image/png,no-comma-ok", where="w").data == b"no-comma-ok"
    assert from_url("image", "data:nonsense", where="w").problem == "its data URL is malformed"
    assert "http(s)" in (from_url("image", "ftp://host/x.png", where="w").problem or "")
    assert from_url("image", "https://example.com/x.png", where="w").url == "https://example.com/x.png"
    assert from_text(3, where="w").problem == "its text must be a string"


def test_two_unreadable_parts_are_not_one_attachment() -> None:
    one = from_base64("image", "image/png", "!!", where="a[0]")
    two = from_base64("image", "image/png", "??", where="a[1]")
    assert one.sha256 != two.sha256


# --- checking ------------------------------------------------------------------------------------------


def test_a_good_image_and_documents_pass() -> None:
    items = [from_base64("image", "image/png", b64(PNG), where="a"),
             from_base64("document", "application/pdf", b64(pdf()), where="b"),
             from_text("hello", media_type="text/markdown", name="notes.md", where="c")]
    assert [a.data for a in check(items, Limits(), model="m")] == [PNG, pdf(), b"hello"]


@pytest.mark.parametrize(("item", "code", "words"), [
    (from_base64("image", "image/png", "%%%", where="messages[0].content[1]"), "invalid_attachment", "corrupt"),
    (from_url("image", "https://example.com/a.png", where="messages[0].content[1]"), "invalid_attachment",
     "fetch_urls"),
    (from_base64("image", "image/png", "", where="messages[0].content[1]"), "invalid_attachment", "empty"),
    (from_base64("image", "image/png", b64(PNG[:-20]), where="messages[0].content[1]"), "corrupt_attachment",
     "truncated"),
    (from_base64("image", "image/bmp", b64(b"BM" + bytes(64)), where="messages[0].content[1]"),
     "unsupported_attachment", "not a PNG or JPEG image"),
    (from_base64("image", "image/gif", b64(b"GIF89a" + bytes(20) + b";"), where="messages[0].content[1]"),
     "unsupported_attachment", "PNG and JPEG images only"),
    (from_base64("document", "application/pdf", b64(pdf()[:-30]), where="messages[0].content[1]"),
     "corrupt_attachment", "not a whole PDF"),
    (from_base64("document", "application/zip", b64(b"PK\x03\x04"), where="messages[0].content[1]"),
     "unsupported_attachment", "application/zip"),
    (from_base64("document", "text/plain", b64(b"\xff\xfe\x00"), where="messages[0].content[1]"),
     "unsupported_attachment", "UTF-8"),
])
def test_bad_parts_are_refused_by_name(item: Attachment, code: str, words: str) -> None:
    error = refused([item])
    assert error.param == "messages[0].content[1]" and error.error_code == code and error.status == 400
    assert words in error.message and "messages[0].content[1]" in error.message


def test_an_image_for_a_model_that_cannot_see_is_refused() -> None:
    error = refused([from_base64("image", "image/png", b64(PNG), where="input[0].content[1]")], sees_images=False)
    assert error.error_code == "model_no_image_support" and "noImageSupport" in error.message
    # documents are not images
    check([from_text("x", where="d")], Limits(), model="m", sees_images=False)


def test_limits_of_size_count_and_total() -> None:
    image = from_base64("image", "image/png", b64(PNG), where="p")
    assert refused([image], Limits(max_image_bytes=len(PNG) - 1)).error_code == "attachment_too_large"
    assert "max_count" in refused([image] * 3, Limits(max_count=2)).message
    assert "max_total_bytes" in refused([image] * 3, Limits(max_total_bytes=len(PNG) * 2)).message
    document = from_text("x" * 100, where="d")
    assert refused([document], Limits(max_document_bytes=99)).error_code == "attachment_too_large"


def test_an_image_gets_the_type_its_bytes_say() -> None:
    labelled = from_base64("image", "image/png", b64(JPEG), where="p")  # a .png that is a JPEG
    (checked,) = check([labelled], Limits(), model="m")
    assert checked.media_type == "image/jpeg" and checked.sha256 == labelled.sha256


# --- structured output ---------------------------------------------------------------------------------


def test_valid_schemas_pass() -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[a-z]+$"},
                                               "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                                               "kind": {"enum": ["a", "b"]},
                                               "n": {"anyOf": [{"type": "integer"}, {"type": "null"}]}},
              "required": ["name"], "additionalProperties": False, "$defs": {"x": {"type": "number"}}}
    fmt = structured.output_format(schema, "response_format.json_schema.schema", name="Thing", strict=True)
    assert fmt.schema == schema and fmt.name == "Thing" and fmt.strict


@pytest.mark.parametrize(("schema", "words"), [
    ("not a schema", "must be an object"),
    ({"type": "nonsense"}, "'type' must be one of"),
    ({"type": "object", "properties": {"a": {"type": "strin"}}}, "/properties/a"),
    ({"type": "object", "required": "a"}, "'required'"),
    ({"type": "object", "properties": []}, "'properties'"),
    ({"type": "object", "anyOf": []}, "'anyOf'"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "("}}}, "'pattern'"),
    ({"type": "object", "properties": {"a": {"type": "string", "minLength": -1}}}, "'minLength'"),
    ({"type": "array", "items": {"type": "string"}}, "root must have type \"object\""),
])
def test_bad_schemas_are_refused(schema: Any, words: str) -> None:
    with pytest.raises(errors.InvalidRequest) as info:
        structured.output_format(schema, "text.format.schema")
    assert words in info.value.message and info.value.param == "text.format.schema"
    assert info.value.error_code == "invalid_schema"


# --- every dialect reads them alike ------------------------------------------------------------------


def chat(content: Any, **extra: Any) -> TurnRequest:
    return openai_chat.parse({"model": "m", "messages": [{"role": "user", "content": content}], **extra}, {}).turn


def claude(content: Any, **extra: Any) -> TurnRequest:
    return anthropic.parse({"model": "m", "max_tokens": 9, "messages": [{"role": "user", "content": content}],
                            **extra}, {}).turn


def codex(content: Any, **extra: Any) -> TurnRequest:
    return responses.parse({"model": "m", "input": [{"role": "user", "content": content}], **extra}, {}).turn


def test_an_image_reads_the_same_in_every_dialect() -> None:
    requests = [
        chat([{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": data_url(PNG)}}]),
        claude([{"type": "text", "text": "What is this?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64(PNG)}}]),
        codex([{"type": "input_text", "text": "What is this?"},
               {"type": "input_image", "image_url": data_url(PNG), "detail": "auto"}]),
    ]
    seed = conversation.seed("")
    digests = {conversation.extend(seed, r.messages) for r in requests}
    assert len(digests) == 1  # a conversation begun in one dialect is matched when resent in another
    for request in requests:
        (image,) = conversation.attachments(request.messages)
        assert decoded(image).data == PNG and image.media_type == "image/png"
        assert request.messages[0].text == "What is this?"
    other = chat([{"type": "text", "text": "What is this?"},
                  {"type": "image_url", "image_url": {"url": data_url(png(seed=1))}}])
    assert conversation.extend(seed, other.messages) not in digests


def test_text_only_digests_do_not_change() -> None:
    request = chat("plain words")
    assert request.messages == (Message("user", (Text("plain words"),)),)


def test_documents_in_every_dialect() -> None:
    doc = pdf()
    (a,) = conversation.attachments(chat([{"type": "file", "file": {"file_data": data_url(doc, "application/pdf"),
                                                                    "filename": "a.pdf"}}]).messages)
    (b,) = conversation.attachments(claude([{"type": "document", "title": "a.pdf", "source": {
        "type": "base64", "media_type": "application/pdf", "data": b64(doc)}}]).messages)
    (c,) = conversation.attachments(codex([{"type": "input_file", "filename": "a.pdf", "file_data": b64(doc)}]).messages)
    assert decoded(a).data == decoded(b).data == decoded(c).data == doc and a.sha256 == b.sha256 == c.sha256
    assert {a.media_type, b.media_type, c.media_type} == {"application/pdf"} and a.name == b.name == c.name == "a.pdf"
    (text,) = conversation.attachments(claude([{"type": "document", "source": {
        "type": "text", "media_type": "text/plain", "data": "some notes"}}]).messages)
    assert text.data == b"some notes" and text.is_text
    (blocks,) = conversation.attachments(claude([{"type": "document", "source": {
        "type": "content", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}}]).messages)
    assert blocks.data == b"one\ntwo"


def test_file_ids_are_refused_when_the_turn_is_admitted() -> None:
    for request in (chat([{"type": "file", "file": {"file_id": "file-1"}}]),
                    codex([{"type": "input_image", "file_id": "file-1"}]),
                    claude([{"type": "image", "source": {"type": "file", "file_id": "file-1"}}])):
        (part,) = conversation.attachments(request.messages)
        assert part.problem is not None and "Files API" in part.problem
        assert refused([part]).param == part.where


def test_images_in_tool_results() -> None:
    claude_request = anthropic.parse({"model": "m", "max_tokens": 9, "messages": [
        {"role": "user", "content": "look"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "Read", "input": {"p": "a.png"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [
            {"type": "text", "text": "the file"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64(PNG)}}]}]},
    ]}, {}).turn
    result = claude_request.messages[-1].parts[0]
    assert isinstance(result, ToolResult) and result.content == "the file" and decoded(result.attachments[0]).data == PNG
    assert result.attachments[0].where == "messages[2].content[0].content[1]"
    codex_request = responses.parse({"model": "m", "input": [
        {"role": "user", "content": "look"},
        {"type": "function_call", "call_id": "t1", "name": "Read", "arguments": "{\"p\": \"a.png\"}"},
        {"type": "function_call_output", "call_id": "t1", "output": [
            {"type": "input_text", "text": "the file"}, {"type": "input_image", "image_url": data_url(PNG)}]},
    ]}, {}).turn
    assert conversation.extend("s", codex_request.messages) == conversation.extend("s", claude_request.messages)


def test_assistant_and_system_messages_hold_no_images() -> None:
    with pytest.raises(errors.InvalidRequest):
        openai_chat.parse({"model": "m", "messages": [
            {"role": "system", "content": [{"type": "image_url", "image_url": {"url": data_url(PNG)}}]},
            {"role": "user", "content": "x"}]}, {})


def test_structured_output_in_every_dialect() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    a = chat("x", response_format={"type": "json_schema", "json_schema": {"name": "C", "schema": schema,
                                                                         "strict": True}}).output_format
    b = codex("x", text={"format": {"type": "json_schema", "name": "C", "schema": schema, "strict": True}}).output_format
    c = claude("x", output_config={"format": {"type": "json_schema", "schema": schema}}).output_format
    d = claude("x", output_format={"type": "json_schema", "schema": schema}).output_format
    assert a is not None and b is not None and c is not None and d is not None
    assert a.schema == b.schema == c.schema == d.schema == schema and a.strict and a.name == "C"
    for request in (chat("x", response_format={"type": "json_object"}), codex("x", text={"format": {"type": "json_object"}})):
        assert request.output_format is not None and request.output_format.schema == {"type": "object"}
    assert chat("x", response_format={"type": "text"}).output_format is None
    with pytest.raises(errors.InvalidRequest) as info:
        chat("x", response_format={"type": "json_schema", "json_schema": {"name": "C", "schema": {"type": "bogus"}}})
    assert info.value.param == "response_format.json_schema.schema"
    with pytest.raises(errors.InvalidRequest) as info:
        claude("x", output_format={"type": "json_schema"})
    assert info.value.param == "output_format.schema"


# --- what droid is given ------------------------------------------------------------------------------


def test_droid_gets_images_files_and_the_schema() -> None:
    items = check([from_base64("image", "image/png", b64(PNG), where="a"),
                   from_base64("document", "application/pdf", b64(pdf()), name="a.pdf", where="b"),
                   from_text("notes", name="n.txt", where="c")], Limits(), model="m")
    request = chat("x", response_format={"type": "json_object"})
    params = conversation.user_message("hello", items, request.output_format).params()
    assert params["text"] == "hello"
    assert params["images"] == [{"type": "base64", "mediaType": "image/png", "data": b64(PNG)}]
    assert params["files"] == [{"type": "base64", "mediaType": "application/pdf", "data": b64(pdf()), "name": "a.pdf"},
                               {"type": "text", "mediaType": "text/plain", "data": "notes", "name": "n.txt"}]
    md = conversation.user_message("t", check([from_text("# h", media_type="text/markdown", where="m")], Limits(), model="m"), None)
    assert md.params()["files"] == [{"type": "text", "mediaType": "text/plain", "data": "# h", "mime": "text/markdown"}]
    assert params["outputFormat"] == {"type": "json_schema", "schema": {"type": "object"}}
    assert conversation.user_message("t", [], None).params() == {"text": "t"}


def test_tool_result_images_go_to_droid_over_mcp() -> None:
    image = decoded(from_base64("image", "image/png", b64(PNG), where="a"))
    content = mcp_content(ToolResult("t1", "the file", attachments=(image,)))
    assert content == [{"type": "text", "text": "the file"},
                       {"type": "image", "data": base64.b64encode(PNG).decode(), "mimeType": "image/png"}]
    assert mcp_content(ToolResult("t1", "", attachments=(image,)))[0]["type"] == "image"


def test_transcripts_name_the_attachments_they_carry() -> None:
    image = from_base64("image", "image/png", b64(PNG), name="shot.png", where="a")
    history = (Message("user", (Text("see"), image)), Message.of("assistant", "a cat"))
    prompt = conversation.transcript_prompt(history, (Message.of("user", "and now?"),))
    assert f"[image: shot.png, {len(PNG)} bytes]" in prompt
    assert conversation.turn_text((Message("user", (Text("see"), image)),)) == "see"


def test_replaced_reaches_tool_results() -> None:
    url = from_url("image", "https://example.com/a.png", where="a")
    messages = (Message("tool", (ToolResult("t", "x", attachments=(url,)),)), Message("user", (url,)))
    out = attachments.replaced(messages, lambda a: Attachment("image", "image/png", PNG, sha256=a.sha256))
    assert [a.data for a in conversation.attachments(out)] == [PNG, PNG]


@pytest.mark.anyio
async def test_a_structured_turn_sends_keepalives_while_its_text_is_held() -> None:
    import anyio

    from droidpool.core.access import PUBLIC
    from droidpool.core.model import TextOut, TurnResult
    from droidpool.core.output import Accumulator
    from droidpool.core.turn import Deadlines, Turn
    from droidpool.droid.protocol import TextDelta, TurnCompleted, Usage

    class Slow:
        """Two attempts' deltas, 30 ms apart: droid rejects the first, accepts the second."""

        completed = None

        def __init__(self) -> None:
            self.events: list[Any] = [*(TextDelta("a1", c) for c in "not json"),
                                      *(TextDelta("a2", c) for c in '{"ok": true}'), TurnCompleted("completed")]

        async def __anext__(self) -> Any:
            await anyio.sleep(0.03)
            if not self.events:
                raise StopAsyncIteration
            return self.events.pop(0)

    class Books:
        async def complete(self, turn: Turn) -> TurnResult:
            return TurnResult(turn.turn_id, "s", "m", turn.accumulator.text, "", Usage(), 0)

        park = complete

    turn = Turn(turn_id="t", session_id="s", model_id="m", request=TurnRequest("m", ()), access=PUBLIC,
                worker=types.SimpleNamespace(alive=True), stream=Slow(), recorder=Books(),  # type: ignore[arg-type]
                deadlines=Deadlines(5, 5, 1), base="h", sent=(), accumulator=Accumulator(structured=True))
    outputs = [o async for o in turn.outputs(0.1)]
    assert [o for o in outputs if o is not None] == [TextOut('{"ok": true}')]  # the rejected attempt never leaves
    assert outputs.count(None) >= 3  # ~0.6 s of held text: a keep-alive every 0.1 s
