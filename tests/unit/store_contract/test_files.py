"""``SessionFiles``: droid's files of a session, appended and replaced by one node, read by another,
deleted with their session."""

from __future__ import annotations

import pytest

from . import Clock, Opener

pytestmark = pytest.mark.anyio


async def test_a_sessions_files_are_kept_for_every_node(backend: tuple[Opener, Clock]) -> None:
    open_store, _ = backend
    a, b = await open_store(), await open_store()
    for session in ("s1", "s2"):
        await a.create(session, "m")
    await a.save_files("s1", [("f/s1.jsonl", 0, b"line 1\n")], [("f/s1.settings.json", b'{"v": 1}')])
    await a.save_files("s1", [("f/s1.jsonl", 7, b"line 2\n"), ("f/s1.jsonl", 0, b"line 1\n")],
                       [("f/s1.settings.json", b'{"v": 2}')])
    assert await b.load_files("s1") == {"f/s1.jsonl": b"line 1\nline 2\n", "f/s1.settings.json": b'{"v": 2}'}
    assert await b.load_files("s2") == {}
    await b.delete("s1")
    assert await a.load_files("s1") == {}
