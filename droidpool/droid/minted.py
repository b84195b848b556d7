"""Minted sessions: a new conversation's session written by droidpool, loaded into a worker, checked.

droidpool writes ("mints") a new conversation's session itself, in droid's own layout
(``sessions.py``): loading it into any idle droid process starts a clean conversation there in
~50 ms, where a new process takes ~0.6 s. That is droid's internal format (observed on droid
0.225.2), so every load is checked, and a self-test on a fresh process decides at start-up
whether droid still loads minted sessions as written.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .rpc import DroidRequestError
from .sessions import _write_atomic, folder_name
from .spec import LaunchSpec, SessionSettings
from .worker import Worker

# droid's autonomy levels and the autonomy modes it stores with them.
AUTONOMY_MODES = {"off": "normal", "low": "auto-low", "medium": "auto-medium", "high": "auto-high"}
SESSION_FORMAT_VERSION = 2


class MintFailed(Exception):
    """A minted session did not load as written: droid's format is not the one droidpool knows."""


@dataclass(frozen=True)
class Minted:
    """A session droidpool wrote: its id, its working directory, and its two files."""

    session_id: str
    cwd: Path
    settings_path: Path
    jsonl_path: Path


def settings_document(settings: SessionSettings) -> dict[str, Any]:
    """The ``.settings.json`` of a new session: everything droid fixes at its start."""
    doc: dict[str, Any] = {
        "reasoningEffort": settings.reasoning_effort or "none",
        "interactionMode": "auto",
        "autonomyLevel": settings.autonomy,
        "autonomyMode": AUTONOMY_MODES[settings.autonomy],
        "disabledToolIds": list(settings.disabled_tool_ids),
    }
    if settings.model_id:
        doc["model"] = settings.model_id
    if settings.system_prompt:
        doc["systemPrompt"] = settings.system_prompt
    return doc


def session_lines(session_id: str, cwd: Path, title: str | None, now: float) -> list[dict[str, Any]]:
    """The ``.jsonl`` of a new session: its start, and one empty context message (droid
    replaces it with a fresh one of its own; a session with no message would not load)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
    start: dict[str, Any] = {"type": "session_start", "id": session_id, "title": title or "New Session",
                             "owner": "unknown", "version": SESSION_FORMAT_VERSION, "cwd": str(cwd)}
    if title:
        start["isSessionTitleManuallySet"] = True  # no title request to the LLM on the first turn
    context = {"type": "message", "id": f"context-{uuid.uuid4()}", "timestamp": stamp,
               "message": {"role": "user", "content": [], "visibility": "llm_only"}}
    return [start, context]


def mint(sessions_dir: Path, workdir_root: Path, settings: SessionSettings, title: str | None,
         session_id: str | None = None) -> Minted:
    """Write a new session for ``settings`` with a working directory of its own under
    ``workdir_root``. The settings file goes first, each file atomically (written aside, then
    renamed), so droid never reads half a session."""
    session_id = session_id or str(uuid.uuid4())
    cwd = workdir_root / session_id
    cwd.mkdir(parents=True, mode=0o700, exist_ok=True)
    folder = sessions_dir / folder_name(str(cwd))
    folder.mkdir(parents=True, mode=0o700, exist_ok=True)
    settings_path = folder / f"{session_id}.settings.json"
    jsonl_path = folder / f"{session_id}.jsonl"
    _write_atomic(settings_path, json.dumps(settings_document(settings)).encode())
    lines = session_lines(session_id, cwd, title, time.time())
    _write_atomic(jsonl_path, b"".join(json.dumps(line).encode() + b"\n" for line in lines))
    return Minted(session_id, cwd, settings_path, jsonl_path)


def check_loaded(result: Mapping[str, Any], minted: Minted, settings: SessionSettings) -> list[str]:
    """What is wrong with droid's answer to ``load_session`` of a minted session (empty: all
    well). A process that loaded it must hold exactly that one empty message, the expected
    system prompt and working directory: anything else could leak an earlier conversation."""
    problems = []
    session = result.get("session")
    messages = session.get("messages") if isinstance(session, Mapping) else None
    if not isinstance(messages, list) or len(messages) != 1:
        count = len(messages) if isinstance(messages, list) else "no"
        problems.append(f"the loaded session holds {count} messages, not the 1 written")
    elif not isinstance(messages[0], Mapping) or messages[0].get("visibility") != "llm_only" \
            or messages[0].get("content"):
        problems.append("the loaded session's message is not the empty context message written")
    loaded = result.get("settings")
    prompt = loaded.get("systemPrompt") if isinstance(loaded, Mapping) else None
    if settings.system_prompt and prompt != settings.system_prompt:
        problems.append("the loaded session does not have the system prompt written")
    if result.get("cwd") != str(minted.cwd):
        problems.append(f"the loaded session's cwd is {result.get('cwd')!r}, not {str(minted.cwd)!r}")
    return problems


# --- in a worker --------------------------------------------------------------------------------


async def start(worker: Worker, spec: LaunchSpec, settings: SessionSettings, timeout: float,
                mcp_servers: list[dict[str, Any]] | None = None) -> Minted:
    """Start a new conversation in ``worker``: write its session, load it, check what droid
    holds; the worker then holds a session with ``settings``. ``MintFailed`` (naming what was
    wrong) if droid refused it or did not load it as written."""
    minted = mint(Path(spec.sessions_dir), Path(spec.cwd) / "sessions", settings, spec.session_title)
    try:
        result = await worker.load_session(minted.session_id, timeout, mcp_servers)
    except DroidRequestError as exc:
        raise MintFailed(f"droid refused {exc.method} of a minted session: {exc.droid_message}") from None
    problems = check_loaded(result, minted, settings)
    if problems:
        raise MintFailed("; ".join(problems))
    worker.adopt(settings, minted.cwd)
    return minted


async def self_test(worker: Worker, spec: LaunchSpec, base: SessionSettings, timeout: float) -> list[str]:
    """Load a session written the way droidpool writes them into ``worker`` (a process that has
    held no conversation), and check droid holds exactly it: one empty message, the system
    prompt written, its working directory. What is wrong (empty: droid loads them as written)."""
    marker = f"droidpool self-test {uuid.uuid4().hex}"
    settings = SessionSettings(model_id=base.model_id, system_prompt=marker, autonomy="off",
                               disabled_tool_ids=base.disabled_tool_ids)
    try:
        minted = mint(Path(spec.sessions_dir), Path(spec.cwd) / "self-test", settings, spec.session_title)
        result = await worker.load_session(minted.session_id, timeout)
    except DroidRequestError as exc:
        return [f"droid refused droid.load_session: {exc.droid_message}"]
    except OSError as exc:
        return [f"cannot write a session in {spec.sessions_dir}: {exc}"]
    return check_loaded(result, minted, settings)
