"""droid's image files on disk: which folder a worker writes, and which folders nobody will use again.

droid 0.225.2 writes every image it is sent to ``$HOME/.factory/temp/images/<8 hex>/<uuid>.png``,
where ``<8 hex>`` is drawn once per process (its first image creates the folder). A process that
exits normally deletes its folder; one that is killed leaves it. A live process whose folder is
deleted fails every later image turn, so a folder goes only when no live worker owns it.
PDFs live with their session instead (``sessions/<session id>/attachments``): they are pruned
with the session's files (``droid/sessions.apply_prune``).
"""

from __future__ import annotations

import mmap
import re
import shutil
from collections.abc import Collection
from pathlib import Path

_IMAGE_DIR = re.compile(rb"/\.factory/temp/images/([0-9a-f]{8})/")


def images_root(sessions_dir: Path) -> Path:
    """``<HOME>/.factory/temp/images`` for droid's ``<HOME>/.factory/sessions``."""
    return sessions_dir.parent / "temp" / "images"


def owned_dir(sessions_dir: Path, session_id: str) -> str | None:
    """The image folder of the process that ran ``session_id``'s last image turn: droid names its
    images' paths in the session file (a text part beside each image)."""
    for path in sessions_dir.glob(f"*/{session_id}.jsonl"):
        try:
            with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
                found = [m.group(1) for m in _IMAGE_DIR.finditer(data)]
        except (OSError, ValueError):
            continue
        if found:
            return found[-1].decode()
    return None


def stale_dirs(root: Path, live: Collection[str], now: float, min_age_s: float) -> list[Path]:
    """Folders under ``root`` no live worker owns, untouched for ``min_age_s`` (a worker that just
    wrote its first image is known only once its turn has ended)."""
    if not root.is_dir():
        return []
    out = []
    for folder in root.iterdir():
        if not folder.is_dir() or folder.name in live:
            continue
        try:
            newest = max([folder.stat().st_mtime, *(p.stat().st_mtime for p in folder.iterdir())])
        except OSError:
            continue
        if now - newest >= min_age_s:
            out.append(folder)
    return out


def remove(folders: Collection[Path]) -> int:
    """Delete ``folders``; the bytes freed."""
    freed = 0
    for folder in folders:
        freed += sum(p.stat().st_size for p in folder.glob("*") if p.is_file())
        shutil.rmtree(folder, ignore_errors=True)
    return freed
