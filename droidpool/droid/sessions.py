"""droid's sessions on disk: ``<HOME>/.factory/sessions/<cwd folder>/<id>.jsonl`` and its settings.

This module owns droid's on-disk session layout (observed on droid 0.225.2; it is droid's
internal format): the folder named after the session's working directory, the
``.settings.json`` that fixes a session's system prompt, model, effort, autonomy and tools, and
the ``.jsonl`` of its messages. Here: finding and pruning droidpool's sessions, copying them
between nodes, and cutting a crashed turn out of one. Writing a new one is ``minted.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from droidpool.config import Config

from .launch import droid_dir


def folder_name(cwd: str) -> str:
    """droid's folder for sessions that run in ``cwd``: every ``/`` becomes ``-``."""
    return cwd.replace("/", "-")


def _write_atomic(path: Path, data: bytes) -> None:
    aside = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(aside, path)


@dataclass(frozen=True)
class DroidSessionFiles:
    """One droid session on disk: ``<id>.jsonl`` and its ``.settings.json`` companions."""

    session_id: str
    paths: tuple[Path, ...]
    cwd: str | None  # from the session_start line: the working directory droid ran in
    mtime: float


def droid_sessions_dir(config: Config) -> Path:
    """``<droid HOME>/.factory/sessions``: the workers' HOME (or FACTORY_HOME_OVERRIDE)."""
    return droid_dir(config) / "sessions"


def scan_droid_sessions(sessions_dir: Path) -> list[DroidSessionFiles]:
    """Every droid session under ``sessions_dir`` (one folder per working directory)."""
    name = re.compile(r"^([0-9a-fA-F-]{8,64})\.(jsonl|settings\.json|settings\.json\.bak)$")
    grouped: dict[tuple[Path, str], list[Path]] = {}
    for folder in sorted(p for p in sessions_dir.glob("*") if p.is_dir()):
        for path in folder.iterdir():
            match = name.match(path.name)
            if match and path.is_file():
                grouped.setdefault((folder, match.group(1)), []).append(path)
    found: list[DroidSessionFiles] = []
    for (folder, session_id), paths in sorted(grouped.items()):
        cwd = None
        try:
            with (folder / f"{session_id}.jsonl").open("rb") as f:
                first = json.loads(f.readline(1 << 20) or b"{}")
            cwd = first.get("cwd") if isinstance(first, dict) and isinstance(first.get("cwd"), str) else None
        except (OSError, ValueError):
            pass
        mtime = max((p.stat().st_mtime for p in paths), default=0.0)
        found.append(DroidSessionFiles(session_id, tuple(sorted(paths)), cwd, mtime))
    return found


def within(cwd: str | None, roots: set[Path]) -> bool:
    return cwd is not None and any(Path(cwd) == root or root in Path(cwd).parents for root in roots)


def files_to_prune(
    found: list[DroidSessionFiles], roots: set[Path], known: dict[str, bool], now: float, min_age_s: float
) -> list[tuple[DroidSessionFiles, str]]:
    """Which droid sessions droidpool's workers made and nobody can reach any more, and why.

    Only sessions droid ran in (or under) droidpool's worker cwd are candidates: never a
    user's own droid sessions. A session the store holds live is kept; an expired one goes;
    an unknown one goes once untouched for ``min_age_s`` (a warm spare's session is unknown
    to the store until its first turn).
    """
    out: list[tuple[DroidSessionFiles, str]] = []
    for session in found:
        if not within(session.cwd, roots):
            continue
        live = known.get(session.session_id)
        if live:
            continue
        if live is False:
            out.append((session, "expired"))
        elif now - session.mtime >= min_age_s:
            out.append((session, "unknown"))
    return out


def workdirs_to_prune(
    workdirs: list[tuple[Path, float]], found: list[DroidSessionFiles], doomed: set[str], now: float,
    min_age_s: float,
) -> list[Path]:
    """Per-session working directories (``<worker cwd>/sessions/<name>``) that no kept droid
    session works in: a pruned session's, or one no session file names (untouched ``min_age_s``)."""

    def real(path: str | Path | None) -> Path | None:
        return Path(path).resolve() if path is not None else None

    kept = {real(s.cwd) for s in found if s.session_id not in doomed}
    named = {real(s.cwd) for s in found}
    return [
        path for path, mtime in workdirs
        if real(path) not in kept and (real(path) in named or now - mtime >= min_age_s)
    ]


@dataclass(frozen=True)
class PrunePlan:
    """What pruning would delete: droid sessions (with why), working directories, and how many
    of droidpool's sessions stay."""

    sessions: list[tuple[DroidSessionFiles, str]]
    workdirs: list[Path]
    kept: int

    @property
    def bytes(self) -> int:
        own = [p for s, _ in self.sessions for p in s.paths]
        attached = [p for s, _ in self.sessions for p in (s.paths[0].parent.parent / s.session_id).rglob("*")]
        return sum(p.stat().st_size for p in (*own, *attached) if p.is_file())


WORKDIR_ROOTS = ("sessions", "self-test")  # under the workers' cwd: one directory per session


def plan_prune(sessions_dir: Path, worker_cwd: Path, known: Mapping[str, bool], now: float, min_age_s: float,
               protected: frozenset[str] = frozenset()) -> PrunePlan:
    """The sessions and working directories nobody can reach any more (see ``files_to_prune``);
    ``protected`` session ids (held by live workers) and their directories always stay."""
    roots = {worker_cwd, worker_cwd.resolve()}
    found = scan_droid_sessions(sessions_dir) if sessions_dir.is_dir() else []
    doomed = [(s, why) for s, why in files_to_prune(found, roots, dict(known), now, min_age_s)
              if s.session_id not in protected]
    workdirs = [(p, p.stat().st_mtime) for root in WORKDIR_ROOTS if (worker_cwd / root).is_dir()
                for p in sorted((worker_cwd / root).iterdir()) if p.is_dir()]
    held = {Path(s.cwd).resolve() for s in found if s.session_id in protected and s.cwd}
    dead = [d for d in workdirs_to_prune(workdirs, found, {s.session_id for s, _ in doomed}, now, min_age_s)
            if d.resolve() not in held and d.name not in protected]
    kept = sum(1 for s in found if within(s.cwd, roots)) - len(doomed)
    return PrunePlan(doomed, dead, kept)


def apply_prune(plan: PrunePlan) -> None:
    """Delete what ``plan`` names (droid's folder for a cwd goes too once empty)."""
    import contextlib

    for session, _ in plan.sessions:
        for path in session.paths:
            path.unlink(missing_ok=True)
        # droid keeps a session's PDFs in a folder named after it: <sessions>/<id>/attachments
        shutil.rmtree(session.paths[0].parent.parent / session.session_id, ignore_errors=True)
        with contextlib.suppress(OSError):
            session.paths[0].parent.rmdir()
    for path in plan.workdirs:
        shutil.rmtree(path, ignore_errors=True)


# --- portable sessions: droid's files copied verbatim between nodes -----------------------------

GROWING = ".jsonl"  # droid only appends to it
REWRITTEN = ".settings.json"  # small; droid rewrites it


def session_file_paths(sessions_dir: Path, session_id: str) -> dict[str, Path]:
    """A session's files, by their path relative to ``sessions_dir`` (``<folder>/<id>.jsonl`` and
    ``<folder>/<id>.settings.json``)."""
    out: dict[str, Path] = {}
    for suffix in (GROWING, REWRITTEN):
        for path in sessions_dir.glob(f"*/{session_id}{suffix}"):
            out[str(path.relative_to(sessions_dir))] = path
    return out


def complete_lines(data: bytes) -> bytes:
    """``data`` up to its last newline: a line droid is still writing is left for next time."""
    end = data.rfind(b"\n")
    return data[: end + 1] if end >= 0 else b""


def restore_session_files(sessions_dir: Path, files: Mapping[str, bytes]) -> Path | None:
    """Write a session's stored files under ``sessions_dir`` as they were (each atomically), and
    create the working directory its ``session_start`` line names; that directory, if any."""
    cwd: Path | None = None
    for name, data in files.items():
        target = (sessions_dir / name).resolve()
        if sessions_dir.resolve() not in target.parents:
            raise ValueError(f"a stored session file escapes the sessions directory: {name!r}")
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(target, data)
        if name.endswith(GROWING) and cwd is None:
            try:
                start = json.loads(data.split(b"\n", 1)[0])
            except ValueError:
                continue
            if isinstance(start, dict) and isinstance(start.get("cwd"), str):
                cwd = Path(start["cwd"])
    if cwd is not None:
        cwd.mkdir(parents=True, exist_ok=True)
    return cwd


# --- crash consistency: no user message the client was never answered --------------------------


def unanswered_cut(data: bytes, client_tool_prefix: str) -> int | None:
    """Where droid's session file must end so that it holds no turn its client never saw end: the
    byte offset to cut at, or None when nothing needs cutting.

    droid writes a turn's user message when the turn starts and an ``agent_turn_outcome`` line
    when it ends. Everything after the last turn droid answered (outcome ``completed``) goes: a
    turn cut short by a crash has no outcome line, and one whose droid outlived droidpool ends
    ``process_exit`` or ``cancelled`` with droid's own cancellation messages; the turn's
    ``context-<id>`` message goes with it. A turn that had parked on client tools keeps its user
    message and its calls: the client has those, and its results come back as a message."""
    records: list[tuple[int, int, dict[str, Any]]] = []
    offset = 0
    for line in data.split(b"\n"):
        end = offset + len(line) + 1
        try:
            obj = json.loads(line) if line.strip() else {}
        except ValueError:
            obj = {}
        records.append((offset, min(end, len(data)), obj if isinstance(obj, dict) else {}))
        offset = end
    after = max((i for i, (_, _, o) in enumerate(records)
                 if o.get("type") == "agent_turn_outcome" and o.get("reason") in ANSWERED), default=0) + 1
    start = next((i for i in range(after, len(records)) if _is_prompt(records[i][2])), None)
    if start is None:
        return None
    prompt_id = records[start][2].get("id")
    cut = start - 1 if start - 1 >= after and records[start - 1][2].get("id") == f"context-{prompt_id}" else start
    for i in range(start + 1, len(records)):
        if _calls_client_tools(records[i][2], client_tool_prefix):
            return records[i][1] if records[i][1] < len(data) else None
    return records[cut][0]


ANSWERED = frozenset({"completed", "spec_handoff"})


def _is_prompt(obj: Mapping[str, Any]) -> bool:
    """A user's message (not droid's context, not tool results)."""
    message = obj.get("message")
    if obj.get("type") != "message" or not isinstance(message, dict) or message.get("role") != "user":
        return False
    if str(obj.get("id", "")).startswith(("context-", "__internal__")) or message.get("visibility") == "llm_only":
        return False
    content = message.get("content")
    return not (isinstance(content, list) and content
                and all(isinstance(b, dict) and b.get("type") == "tool_result" for b in content))


def _calls_client_tools(obj: Mapping[str, Any], prefix: str) -> bool:
    message = obj.get("message")
    if obj.get("type") != "message" or not isinstance(message, dict) or message.get("role") != "assistant":
        return False
    content = message.get("content")
    return isinstance(content, list) and any(
        isinstance(b, dict) and b.get("type") == "tool_use" and str(b.get("name", "")).startswith(prefix)
        for b in content)


def drop_unanswered(sessions_dir: Path, session_id: str, client_tool_prefix: str) -> int:
    """Cut ``session_id``'s file back to its last answered turn (see ``unanswered_cut``); the bytes removed."""
    removed = 0
    for path in sessions_dir.glob(f"*/{session_id}{GROWING}"):
        data = path.read_bytes()
        cut = unanswered_cut(data, client_tool_prefix)
        if cut is not None:
            _write_atomic(path, data[:cut])
            removed += len(data) - cut
    return removed


def carry_attachments(sessions_dir: Path, source_id: str, fork_id: str) -> int:
    """A fork of ``source_id`` gets its own copy of the source's PDFs (droid keeps them in
    ``<sessions>/<session id>/attachments`` and its fork points at the source's, which go when the
    source is pruned); the fork's file is pointed at the copies. The files copied."""
    source = sessions_dir / source_id / "attachments"
    if not source.is_dir():
        return 0
    target = sessions_dir / fork_id / "attachments"
    shutil.copytree(source, target, dirs_exist_ok=True)
    old, new = f"/sessions/{source_id}/attachments/".encode(), f"/sessions/{fork_id}/attachments/".encode()
    for path in sessions_dir.glob(f"*/{fork_id}{GROWING}"):
        data = path.read_bytes()
        if old in data:
            _write_atomic(path, data.replace(old, new))
    return sum(1 for p in target.iterdir() if p.is_file())
