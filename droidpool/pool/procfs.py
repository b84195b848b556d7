"""Process facts from /proc: resident memory per process group, and zombie checks."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")
PROC = Path("/proc")


def _stat_fields(pid_dir: Path) -> list[str] | None:
    try:
        raw = (pid_dir / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    return raw.rsplit(")", 1)[1].split()


def group_rss(pgids: Iterable[int]) -> dict[int, int]:
    """Resident bytes of every live process in each of ``pgids`` (one scan of /proc)."""
    wanted = set(pgids)
    totals = dict.fromkeys(wanted, 0)
    if not wanted:
        return totals
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(entry)
        if fields is None or fields[0] == "Z":
            continue
        pgid = int(fields[2])
        if pgid in wanted:
            totals[pgid] += int(fields[21]) * PAGE  # rss, in pages
    return totals


def mem_available() -> int:
    """Bytes of memory available for new processes (``MemAvailable`` in /proc/meminfo)."""
    try:
        for line in (PROC / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def process_rss(pid: int) -> int:
    fields = _stat_fields(PROC / str(pid))
    return int(fields[21]) * PAGE if fields else 0


def children(pid: int) -> list[tuple[int, str]]:
    """Direct children of ``pid`` with their state letter (``Z`` = zombie)."""
    out = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(entry)
        if fields is not None and int(fields[1]) == pid:
            out.append((int(entry.name), fields[0]))
    return out


def leftover_workers(root: Path, ours: int) -> list[int]:
    """droid workers a previous droidpool left running: ``droid exec ... stream-jsonrpc``
    processes whose working directory is ``root`` (or below) and that are not ``ours``'s."""
    root = root.resolve()
    mine = set(_descendants(ours))
    found = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine or int(entry.name) == ours:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:
            continue
        if b"exec" in cmdline and b"stream-jsonrpc" in cmdline and (cwd == root or root in cwd.parents):
            found.append(int(entry.name))
    return found


def _descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(entry)
            if fields is not None:
                parents.setdefault(int(fields[1]), []).append(int(entry.name))
    out, stack = [], [pid]
    while stack:
        for child in parents.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out
