"""droid's sessions on disk: ``<HOME>/.factory/sessions/<cwd folder>/<id>.jsonl`` and its settings."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from droidpool.config import Config

from .launch import droid_dir


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
