"""droid's files beside its sessions: temp image folders per process, PDFs per session, and the
session file cut back to its last answered turn."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from droidpool.core.tools import LLM_PREFIX
from droidpool.droid import images, sessions
from droidpool.droid.worker import SessionSettings


def lines(*objects: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(o).encode() + b"\n" for o in objects)


def message(mid: str, role: str, content: Any = (), **extra: Any) -> dict[str, Any]:
    return {"type": "message", "id": mid, "message": {"role": role, "content": list(content), **extra}}


START = {"type": "session_start", "id": "s", "cwd": "/w/s"}
MINTED_CONTEXT = message("context-m", "user", visibility="llm_only")


def turn(uid: str, text: str) -> bytes:
    return lines(message(f"context-{uid}", "user", [{"type": "text", "text": "env"}], visibility="llm_only"),
                 message(uid, "user", [{"type": "text", "text": text}]),
                 message(f"a-{uid}", "assistant", [{"type": "text", "text": "answer"}]),
                 {"type": "agent_turn_outcome", "turnId": uid, "reason": "completed"})


def test_a_whole_session_file_is_left_alone() -> None:
    data = lines(START, MINTED_CONTEXT) + turn("u1", "alpha") + turn("u2", "beta")
    assert sessions.unanswered_cut(data, LLM_PREFIX) is None
    assert sessions.unanswered_cut(lines(START, MINTED_CONTEXT), LLM_PREFIX) is None


def test_an_interrupted_turn_is_cut_with_its_context() -> None:
    answered = lines(START, MINTED_CONTEXT) + turn("u1", "alpha")
    interrupted = lines(message("context-u2", "user", [{"type": "text", "text": "env"}], visibility="llm_only"),
                        message("u2", "user", [{"type": "text", "text": "the question nobody answered"}]),
                        message("a-u2", "assistant", [{"type": "text", "text": "half an ans"}]))
    assert sessions.unanswered_cut(answered + interrupted, LLM_PREFIX) == len(answered)
    # droid may have been mid-line when it was killed
    assert sessions.unanswered_cut(answered + interrupted[:-7], LLM_PREFIX) == len(answered)


def test_a_first_turn_goes_back_to_the_minted_session() -> None:
    minted = lines(START, MINTED_CONTEXT)
    first = lines(message("context-u1", "user", [{"type": "text", "text": "env"}], visibility="llm_only"),
                  message("u1", "user", [{"type": "text", "text": "hello"}]))
    assert sessions.unanswered_cut(minted + first, LLM_PREFIX) == len(minted)


def test_a_turn_parked_on_client_tools_keeps_its_calls() -> None:
    answered = lines(START, MINTED_CONTEXT) + turn("u1", "alpha")
    parked = lines(message("u2", "user", [{"type": "text", "text": "weather?"}]),
                   message("a-u2", "assistant", [{"type": "tool_use", "id": "c1", "name": f"{LLM_PREFIX}get_weather",
                                                  "input": {"city": "Oslo"}}]))
    resumed = lines(message("r-u2", "user", [{"type": "tool_result", "tool_use_id": "c1", "content": "Sunny"}]),
                    message("b-u2", "assistant", [{"type": "text", "text": "It is sun"}]))
    assert sessions.unanswered_cut(answered + parked + resumed, LLM_PREFIX) == len(answered + parked)
    assert sessions.unanswered_cut(answered + parked, LLM_PREFIX) is None
    own_tool = lines(message("u2", "user", [{"type": "text", "text": "ls?"}]),
                     message("a-u2", "assistant", [{"type": "tool_use", "id": "c1", "name": "LS", "input": {}}]))
    assert sessions.unanswered_cut(answered + own_tool, LLM_PREFIX) == len(answered)  # droid's own tool: cut


def test_drop_unanswered_rewrites_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "-w-s"
    folder.mkdir()
    path = folder / "s.jsonl"
    answered = lines(START, MINTED_CONTEXT) + turn("u1", "alpha")
    path.write_bytes(answered + lines(message("u2", "user", [{"type": "text", "text": "orphan"}])))
    assert sessions.drop_unanswered(tmp_path, "s", LLM_PREFIX) > 0
    assert path.read_bytes() == answered
    assert sessions.drop_unanswered(tmp_path, "s", LLM_PREFIX) == 0


def test_a_workers_image_folder_is_read_from_its_session_file(tmp_path: Path) -> None:
    folder = tmp_path / "sessions" / "-w-s"
    folder.mkdir(parents=True)
    reminder = ("<system-reminder>Attached image local file paths:\n- Image 1: /home/d/.factory/temp/images/"
                "0a1b2c3d/5e4f.png\n</system-reminder>")
    (folder / "s.jsonl").write_bytes(lines(START, message("u1", "user", [{"type": "text", "text": reminder}])))
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
    minted = sessions.mint(droid_dir, work / "sessions", SessionSettings(), "t", session_id=sid)
    attachments = droid_dir / sid / "attachments"
    attachments.mkdir(parents=True)
    (attachments / "1-doc.pdf").write_bytes(b"%PDF-1.4 " + bytes(1000))
    plan = sessions.plan_prune(droid_dir, work, {sid: False}, time.time(), 3600)
    assert plan.bytes >= 1009
    sessions.apply_prune(plan)
    assert not minted.jsonl_path.exists() and not (droid_dir / sid).exists()
