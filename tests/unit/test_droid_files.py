"""droid's files beside its sessions: temp image folders per process, PDFs per session, and the
session file cut back to its last answered turn."""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

from droidpool.core.tools import LLM_PREFIX
from droidpool.droid import images, sessions
from droidpool.droid.minted import mint
from droidpool.droid.sessions import drop_unanswered, unanswered_cut
from droidpool.droid.worker import SessionSettings

REPO = Path(__file__).parents[2]


# The fake droid keeps its history in a store of its own, not in droid's session .jsonl layout, so
# crash consistency is checked here on files in droid 0.225.2's layout (as in
# tests/fixtures/droid_session/), and end to end with the real droid in tests/e2e/test_crash_real_droid.py.

_ids = (f"{n:08x}-0000-4000-8000-000000000000" for n in itertools.count(1))


def record(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def start_line(session: str = "s1") -> bytes:
    return record({"type": "session_start", "id": session, "title": "t", "owner": "unknown", "version": 2,
                 "cwd": "/tmp/w"})


def minted_context() -> bytes:
    return record({"type": "message", "id": f"context-{next(_ids)}", "timestamp": "2026-12-01T00:00:00.000Z",
                 "message": {"role": "user", "content": [], "visibility": "llm_only"}})


def prompt(text: str, with_context: bool = True) -> tuple[str, bytes]:
    """A user's message as droid writes it when a turn starts (with its context-<id> line)."""
    pid = next(_ids)
    out = b""
    if with_context:
        out += record({"type": "message", "id": f"context-{pid}", "timestamp": "2026-12-01T00:00:01.000Z",
                     "message": {"role": "user", "content": [{"type": "text", "text": "<system-reminder>x"}]}})
    out += record({"type": "message", "id": pid, "parentId": f"context-{pid}", "timestamp": "2026-12-01T00:00:01.000Z",
                 "message": {"role": "user", "content": [{"type": "text", "text": text}], "interactionMode": "auto"}})
    return pid, out


def assistant(text: str, tools: tuple[str, ...] = ()) -> bytes:
    content: list[Any] = [{"type": "text", "text": text}]
    content += [{"type": "tool_use", "id": f"call_{i}", "name": name, "input": {"city": "Oslo"}}
                for i, name in enumerate(tools)]
    return record({"type": "message", "id": next(_ids), "timestamp": "2026-12-01T00:00:02.000Z",
                 "message": {"role": "assistant", "content": content, "modelId": "custom:fake-echo"}})


def tool_result(call: str, text: str) -> bytes:
    return record({"type": "message", "id": next(_ids), "timestamp": "2026-12-01T00:00:03.000Z",
                 "message": {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call,
                                                          "content": text}]}})


def outcome(turn: str, reason: str = "completed") -> bytes:
    return record({"type": "agent_turn_outcome", "turnId": turn, "reason": reason, "resultKind": "text"})


def completed_turn(text: str) -> bytes:
    pid, lines = prompt(text)
    return lines + assistant(f"answer to {text}") + outcome(pid)


def cut(data: bytes) -> bytes | None:
    offset = unanswered_cut(data, LLM_PREFIX)
    return None if offset is None else data[:offset]


def test_a_whole_file_needs_no_cut() -> None:
    whole = start_line() + minted_context() + completed_turn("one") + completed_turn("two")
    assert unanswered_cut(whole, LLM_PREFIX) is None
    assert unanswered_cut(start_line() + minted_context(), LLM_PREFIX) is None  # minted, never used
    recorded = next((REPO / "tests" / "fixtures" / "droid_session").glob("*/*.jsonl")).read_bytes()
    assert unanswered_cut(recorded, LLM_PREFIX) is None


def test_an_interrupted_turn_loses_its_context_and_user_message() -> None:
    kept = start_line() + minted_context() + completed_turn("one") + completed_turn("two")
    _, interrupted = prompt("three, never answered")
    assert cut(kept + interrupted) == kept
    # ... and whatever droid wrote of it before the crash (a partial answer, a droid tool call).
    partial = interrupted + assistant("half an ans") + assistant("", tools=("Read",)) + tool_result("call_0", "file")
    assert cut(kept + partial) == kept
    # A later turn droid wrote without a context line of its own.
    _, bare = prompt("four", with_context=False)
    assert cut(kept + bare) == kept


def test_a_parked_turn_keeps_its_user_message_and_calls_but_not_what_followed() -> None:
    kept = start_line() + minted_context() + completed_turn("one")
    _, asked = prompt("weather?")
    calls = assistant("Let me look.", tools=(f"{LLM_PREFIX}get_weather",))
    assert cut(kept + asked + calls) is None  # nothing followed the calls
    after = tool_result("call_0", "Sunny") + assistant("It is sunny")  # resumed, then the crash
    assert cut(kept + asked + calls + after) == kept + asked + calls
    # droid's own tools are not the client's: such a turn goes whole.
    own = assistant("Let me read.", tools=("Read",))
    assert cut(kept + asked + own + tool_result("call_0", "x")) == kept


def test_a_minted_sessions_first_turn_goes_back_to_the_minted_lines() -> None:
    minted = start_line() + minted_context()
    _, first = prompt("first words")
    assert cut(minted + first) == minted
    assert cut(minted + first + assistant("partial")) == minted


def test_drop_unanswered_rewrites_only_the_sessions_file(tmp_path: Path) -> None:
    folder = tmp_path / "sessions" / "-tmp-w"
    folder.mkdir(parents=True)
    kept = start_line("s1") + minted_context() + completed_turn("one")
    _, interrupted = prompt("lost")
    (folder / "s1.jsonl").write_bytes(kept + interrupted)
    other = start_line("s2") + minted_context() + completed_turn("x") + interrupted
    (folder / "s2.jsonl").write_bytes(other)
    assert drop_unanswered(tmp_path / "sessions", "s1", LLM_PREFIX) == len(interrupted)
    assert (folder / "s1.jsonl").read_bytes() == kept
    assert (folder / "s2.jsonl").read_bytes() == other
    assert drop_unanswered(tmp_path / "sessions", "s1", LLM_PREFIX) == 0  # whole now


def test_a_turn_whose_droid_outlived_droidpool_is_cut_with_droids_cancellation() -> None:
    # droidpool was killed alone: its droid, left running, ended the turn itself once stopped
    kept = start_line() + minted_context() + completed_turn("one")
    pid, asked = prompt("the question nobody answered")
    ended = (asked + record({"type": "message", "id": next(_ids), "message": {"role": "user", "content": [
        {"type": "text", "text": "Request interrupted by user"}]}}) + outcome(pid, "process_exit"))
    assert cut(kept + ended) == kept
    failed = completed_turn("two").replace(b'"completed"', b'"model_authentication_failed"')
    assert cut(kept + failed + ended) == kept  # a failed turn was never in the conversation's head either


def test_a_workers_image_folder_is_read_from_its_session_file(tmp_path: Path) -> None:
    folder = tmp_path / "sessions" / "-w-s"
    folder.mkdir(parents=True)
    reminder = ("<system-reminder>Attached image local file paths:\n- Image 1: /home/d/.factory/temp/images/"
                "0a1b2c3d/5e4f.png\n</system-reminder>")
    (folder / "s.jsonl").write_bytes(start_line("s") + record({"type": "message", "id": "u1", "message": {
        "role": "user", "content": [{"type": "text", "text": reminder}]}}))
    assert images.owned_dir(tmp_path / "sessions", "s") == "0a1b2c3d"
    assert images.owned_dir(tmp_path / "sessions", "other") is None


def test_only_image_folders_no_live_worker_owns_are_pruned(tmp_path: Path) -> None:
    root = images.images_root(tmp_path / "sessions")
    old = time.time() - 3600
    for name in ("aaaaaaaa", "bbbbbbbb", "cccccccc"):
        (root / name).mkdir(parents=True)
        (root / name / "x.png").write_bytes(b"\x89PNG" + bytes(100))
    for name in ("aaaaaaaa", "bbbbbbbb"):
        os.utime(root / name / "x.png", (old, old))
        os.utime(root / name, (old, old))
    stale = images.stale_dirs(root, {"aaaaaaaa"}, time.time(), 600)
    assert [p.name for p in stale] == ["bbbbbbbb"]  # a live worker's stays, a young one too
    assert images.remove(stale) == 104 and not (root / "bbbbbbbb").exists()
    assert images.stale_dirs(tmp_path / "nowhere", set(), time.time(), 600) == []


def test_a_sessions_pdfs_go_with_it(tmp_path: Path) -> None:
    droid_dir, work = tmp_path / "sessions", tmp_path / "work"
    sid = "0000000a-0000-4000-8000-000000000000"
    minted = mint(droid_dir, work / "sessions", SessionSettings(), "t", session_id=sid)
    attachments = droid_dir / sid / "attachments"
    attachments.mkdir(parents=True)
    (attachments / "1-doc.pdf").write_bytes(b"%PDF-1.4 " + bytes(1000))
    plan = sessions.plan_prune(droid_dir, work, {sid: False}, time.time(), 3600)
    assert plan.bytes >= 1009
    sessions.apply_prune(plan)
    assert not minted.jsonl_path.exists() and not (droid_dir / sid).exists()


def test_a_fork_gets_its_own_copy_of_the_sources_pdfs(tmp_path: Path) -> None:
    sessions_dir = tmp_path / "sessions"
    source, fork = "0000000a-0000-4000-8000-000000000000", "0000000b-0000-4000-8000-000000000000"
    (sessions_dir / source / "attachments").mkdir(parents=True)
    (sessions_dir / source / "attachments" / "1-doc.pdf").write_bytes(b"%PDF-1.4 x")
    (sessions_dir / "-w").mkdir()
    pdf_path = f"/home/d/.factory/sessions/{source}/attachments/1-doc.pdf"
    (sessions_dir / "-w" / f"{fork}.jsonl").write_bytes(record({"type": "message", "id": "u", "message": {
        "role": "user", "content": [{"type": "document", "source": {"type": "base64", "data": "", "path": pdf_path}}]}}))
    assert sessions.carry_attachments(sessions_dir, source, fork) == 1
    assert (sessions_dir / fork / "attachments" / "1-doc.pdf").read_bytes() == b"%PDF-1.4 x"
    text = (sessions_dir / "-w" / f"{fork}.jsonl").read_text()
    assert f"/sessions/{fork}/attachments/1-doc.pdf" in text and source not in text
    assert sessions.carry_attachments(sessions_dir, fork, "none") == 1  # and on, from a fork
    assert sessions.carry_attachments(sessions_dir, "no-such-session", fork) == 0
