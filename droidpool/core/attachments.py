"""Attachments: reading them from a request (base64, data URLs, text), and checking what droid is sent.

Every dialect builds its image and document parts with the constructors here, so they all decode,
name and hash the same way. A part that cannot be read is kept with its ``problem``; ``check``
reports it, with every other limit, when the turn is admitted (after a parked turn it resumes is
found, so that turn is released rather than left waiting for results it cannot take).
"""

from __future__ import annotations

import binascii
import dataclasses
import hashlib
import re
import struct
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from droidpool import errors

from .model import Attachment, AttachmentKind, Message, Part, ToolResult, is_text_type

MIB = 1024 * 1024
# droid 0.225.2 decodes and re-encodes every image (at most 1024 px, 200 KiB): PNG and JPEG only.
DROID_IMAGE_TYPES = ("image/png", "image/jpeg")
PDF = "application/pdf"
_DATA_URL = re.compile(r"^data:(?P<type>[^;,]*)(?P<params>(?:;[^;,]*)*),(?P<data>.*)$", re.DOTALL)
_WHITESPACE = b" \t\r\n\x0b\x0c"


@dataclass(frozen=True)
class Limits:
    """What one turn may send droid. The defaults follow the strictest of the upstream providers
    (Anthropic: 5 MB an image, 32 MB a request) and droid (10 images in a conversation's context)."""

    max_image_bytes: int = 5 * MIB
    max_document_bytes: int = 32 * MIB
    max_count: int = 10  # droid sends a conversation's last 10 images upstream
    max_total_bytes: int = 32 * MIB
    fetch_urls: bool = False
    fetch_timeout_s: float = 10.0


# --- reading ----------------------------------------------------------------------------------------


def from_base64(kind: AttachmentKind, media_type: str, data: object, *, name: str = "", where: str) -> Attachment:
    """An attachment from base64 text (whitespace inside it is allowed, as MIME wraps lines)."""
    media_type = media_type.strip().lower() if isinstance(media_type, str) else ""
    if not isinstance(data, str):
        return _broken(kind, media_type, name, where, "its data must be a base64 string")
    raw = data.encode("ascii", "replace").translate(None, _WHITESPACE)
    return Attachment(kind, media_type, b"", name, where=where, encoded=raw)


def decoded(attachment: Attachment) -> Attachment:
    """``attachment`` with its bytes (base64 is decoded only for what goes to droid: a history's
    images are known by their hash alone), or with the problem that stops it."""
    if attachment.data or not attachment.encoded or attachment.problem is not None:
        return attachment
    try:
        data = binascii.a2b_base64(attachment.encoded, strict_mode=True)  # 6 ms a megabyte; a regex, 40
    except (binascii.Error, ValueError):
        return dataclasses.replace(attachment, problem="its base64 data is corrupt")
    return dataclasses.replace(attachment, data=data)


def from_url(kind: AttachmentKind, url: object, *, media_type: str = "", name: str = "", where: str) -> Attachment:
    """An attachment from a ``data:`` URL (decoded now) or an http(s) URL (fetched later, if allowed)."""
    if not isinstance(url, str) or not url:
        return _broken(kind, media_type, name, where, "its URL must be a non-empty string")
    if url.startswith("data:"):
        match = _DATA_URL.match(url)
        if match is None:
            return _broken(kind, media_type, name, where, "its data URL is malformed", url.encode())
        declared = match["type"].strip().lower() or media_type
        if ";base64" in match["params"].lower():
            return from_base64(kind, declared, match["data"], name=name, where=where)
        return Attachment(kind, declared, urllib.parse.unquote_to_bytes(match["data"]), name, where=where)
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        return _broken(kind, media_type, name, where, "its URL must be a data: URL or an http(s) URL", url.encode())
    return Attachment(kind, media_type, b"", name, url=url, where=where)


def from_text(text: object, *, media_type: str = "text/plain", name: str = "", where: str) -> Attachment:
    """A text document (Anthropic's text source, a text file part)."""
    if not isinstance(text, str):
        return _broken("document", media_type, name, where, "its text must be a string")
    return Attachment("document", media_type or "text/plain", text.encode(), name, where=where)


def unsupported(kind: AttachmentKind, where: str, why: str) -> Attachment:
    """A part droidpool cannot take (a file id, say): refused, by name, when the turn is admitted."""
    return _broken(kind, "", "", where, why, where.encode())


def _broken(kind: AttachmentKind, media_type: str, name: str, where: str, problem: str,
            raw: bytes = b"") -> Attachment:
    return Attachment(kind, media_type, b"", name, where=where, problem=problem, sha256=_raw_digest(raw, where))


def _raw_digest(raw: bytes, where: str) -> str:
    return hashlib.sha256(b"unreadable\0" + (raw or where.encode())).hexdigest()


def replaced(messages: Iterable[Message], change: Callable[[Attachment], Attachment]) -> tuple[Message, ...]:
    """``messages`` with every attachment (tool results' included) passed through ``change``."""

    def part(p: Part) -> Part:
        if isinstance(p, Attachment):
            return change(p)
        if isinstance(p, ToolResult) and p.attachments:
            return ToolResult(p.call_id, p.content, p.is_error, tuple(change(a) for a in p.attachments))
        return p

    return tuple(Message(m.role, tuple(part(p) for p in m.parts)) for m in messages)


IMAGE_NOT_SHOWN = "[An image the tool returned is not shown: this model does not support image inputs.]"


def tool_image(attachment: Attachment, messages: Iterable[Message]) -> bool:
    """Whether ``attachment`` is an image a tool result of ``messages`` holds."""
    return attachment.kind == "image" and any(
        attachment is a for m in messages for p in m.parts if isinstance(p, ToolResult) for a in p.attachments)


def without_tool_images(messages: Iterable[Message]) -> tuple[Message, ...]:
    """``messages`` whose tool results say, instead of each image, that it is not shown (for a model
    that cannot see images: droid says the same when it is given one)."""

    def part(p: Part) -> Part:
        if not isinstance(p, ToolResult) or not any(a.kind == "image" for a in p.attachments):
            return p
        kept = tuple(a for a in p.attachments if a.kind != "image")
        return ToolResult(p.call_id, f"{p.content}\n{IMAGE_NOT_SHOWN}".lstrip("\n"), p.is_error, kept)

    return tuple(Message(m.role, tuple(part(p) for p in m.parts)) for m in messages)


class Intake:
    """What a turn may give droid, and in what form: the limits, and which models see images."""

    def __init__(self, limits: Limits, sees_images: Callable[[str], bool], alias: Callable[[str], str]) -> None:
        self.limits = limits
        self._sees_images = sees_images
        self._alias = alias

    def checked(self, messages: tuple[Message, ...], model: str, model_id: str) -> list[Attachment]:
        """What ``messages`` attach, checked for droid (a 400 naming the part otherwise). For a model
        that cannot see images, a tool's image is left out (droid is told so in its place) rather
        than refused: an agent cannot choose what its tools return."""
        sees = self._sees_images(model_id)
        items = [a for m in messages for a in m.attachments]
        if not sees:
            items = [a for a in items if not tool_image(a, messages)]
        shown = model if self._alias(model) == model_id else f"{model} ({model_id})"
        return check(items, self.limits, model=shown, sees_images=sees)

    def for_droid(self, messages: tuple[Message, ...], checked: Iterable[Attachment], model_id: str) -> tuple[Message, ...]:
        """``messages`` as droid is given them: each attachment as checked (the type its bytes say),
        and a tool's images replaced by a note for a model that cannot see them."""
        by_hash = {a.sha256: a for a in checked}
        out = replaced(messages, lambda a: by_hash.get(a.sha256, a))
        return out if self._sees_images(model_id) else without_tool_images(out)


# --- what the bytes are -------------------------------------------------------------------------------


def sniff_image(data: bytes) -> str | None:
    """The image type the bytes are, from their signature (None: not an image we take)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def image_complete(media_type: str, data: bytes) -> bool:
    """Whether the image is whole: droid fails the turn on a truncated one (NOTES §6)."""
    if media_type == "image/png":
        return _png_complete(data)
    if media_type == "image/jpeg":
        return data.rstrip(b"\x00").endswith(b"\xff\xd9")
    if media_type == "image/gif":
        return data.rstrip(b"\x00").endswith(b"\x3b")
    if media_type == "image/webp":
        return len(data) >= 12 and struct.unpack("<I", data[4:8])[0] + 8 <= len(data)
    return False


def _png_complete(data: bytes) -> bool:
    """Walk the chunks: each must fit, and the last must be IEND."""
    offset = 8
    while offset + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        offset += 12 + length
        if offset > len(data):
            return False
        if kind == b"IEND":
            return True
    return False


# --- checking what a turn sends ---------------------------------------------------------------------


def check(attachments: Iterable[Attachment], limits: Limits, *, model: str, sees_images: bool = True) -> list[Attachment]:
    """The attachments a turn sends droid, each readable, of a type droid takes and within the
    limits; else an InvalidRequest naming the part. Images get the type their bytes say."""
    out: list[Attachment] = []
    total = 0
    for attachment in attachments:
        where = attachment.where or "messages"
        attachment = decoded(attachment)
        if attachment.problem is not None:
            raise _refuse(f"{where}: {attachment.problem}.", where)
        if attachment.url is not None:
            raise _refuse(f"{where}: attachments by URL are not fetched on this server ([attachments] fetch_urls "
                          "= false); send the data inline (base64 or a data: URL).", where)
        if not attachment.data:
            raise _refuse(f"{where}: the {attachment.kind} is empty.", where)
        attachment = _checked_image(attachment, limits, model, sees_images) if attachment.kind == "image" \
            else _checked_document(attachment, limits)
        total += len(attachment.data)
        out.append(attachment)
    if len(out) > limits.max_count:
        raise _refuse(f"The request attaches {len(out)} images and documents; at most {limits.max_count} may go "
                      "to droid in one turn ([attachments] max_count).", "messages")
    if total > limits.max_total_bytes:
        raise _refuse(f"The request attaches {total} bytes of images and documents; at most "
                      f"{limits.max_total_bytes} may go to droid in one turn ([attachments] max_total_bytes).",
                      "messages")
    return out


def _checked_image(image: Attachment, limits: Limits, model: str, sees_images: bool) -> Attachment:
    where = image.where or "messages"
    if not sees_images:
        raise _refuse(f"{where}: the model {model!r} cannot see images (droid lists it with noImageSupport); "
                      "send text, or choose a model that takes images.", where, code="model_no_image_support")
    if len(image.data) > limits.max_image_bytes:
        raise _refuse(f"{where}: the image is {len(image.data)} bytes; the limit is {limits.max_image_bytes} "
                      "([attachments] max_image_bytes).", where, code="attachment_too_large")
    actual = sniff_image(image.data)
    if actual is None:
        declared = f" (declared {image.media_type})" if image.media_type else ""
        raise _refuse(f"{where}: the data is not a PNG or JPEG image{declared}.", where,
                      code="unsupported_attachment")
    if actual not in DROID_IMAGE_TYPES:
        raise _refuse(f"{where}: droid takes PNG and JPEG images only (it re-encodes every image, and fails the "
                      f"turn on {actual}); convert it first.", where, code="unsupported_attachment")
    if not image_complete(actual, image.data):
        raise _refuse(f"{where}: the {actual} data is truncated or corrupt.", where, code="corrupt_attachment")
    if actual != image.media_type:  # what the bytes are wins over a wrong label (a .png that is a JPEG)
        return dataclasses.replace(image, media_type=actual)
    return image


def _checked_document(document: Attachment, limits: Limits) -> Attachment:
    where = document.where or "messages"
    if len(document.data) > limits.max_document_bytes:
        raise _refuse(f"{where}: the document is {len(document.data)} bytes; the limit is "
                      f"{limits.max_document_bytes} ([attachments] max_document_bytes).", where,
                      code="attachment_too_large")
    media_type = document.media_type
    if media_type == PDF or (not media_type and document.data.startswith(b"%PDF-")):
        if not document.data.startswith(b"%PDF-") or b"%%EOF" not in document.data[-1024:]:
            raise _refuse(f"{where}: the data is not a whole PDF document.", where, code="corrupt_attachment")
        return document if media_type else dataclasses.replace(document, media_type=PDF)
    if media_type and not is_text_type(media_type):
        raise _refuse(f"{where}: documents of type {media_type!r} are not supported; send a PDF or text.", where,
                      code="unsupported_attachment")
    try:
        document.data.decode("utf-8")
    except UnicodeDecodeError:
        raise _refuse(f"{where}: a text document must be UTF-8.", where, code="unsupported_attachment") from None
    return document if media_type else dataclasses.replace(document, media_type="text/plain")


def _refuse(message: str, where: str, code: str = "invalid_attachment") -> errors.InvalidRequest:
    return errors.InvalidRequest(message, param=where, code=code)
