"""`droidpool sessions`: the store file used directly, and the pruning of droid's session files."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import anyio
from click.testing import CliRunner

from droidpool.cli import main
from droidpool.droid.protocol import Usage
from droidpool.store import SqliteStore
from tests.unit.harness import turn_row

TTL = 3600.0


def write_config(tmp_path: Path) -> Path:
    config = tmp_path / "droidpool.toml"
    config.write_text(
        f'[server]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[droid]\nhome = "{tmp_path / "home"}"\n'
        f"[store]\nsession_ttl_s = {TTL}\n"
    )
    return config


def fill_store(tmp_path: Path, live: list[str], expired: list[str]) -> None:
    async def fill() -> None:
        store = SqliteStore(tmp_path / "state" / "sessions.db", TTL)
        await store.open()
        for session_id in live + expired:
            await store.create(session_id, "custom:m", conversation_key=f"key-{session_id}")
            await store.complete_turn(turn_row(session_id, "custom:m", Usage(3, 2, 0, 0, 0)), f"head-{session_id}")
        for session_id in expired:
            store._conn().execute("UPDATE sessions SET updated_at = ? WHERE session_id = ?",
                                  (time.time() - 2 * TTL, session_id))
        await store.close()

    anyio.run(fill)


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_list_show_and_drop_work_on_the_store_file(tmp_path: Path) -> None:
    config = str(write_config(tmp_path))
    fill_store(tmp_path, ["aaaa", "bbbb"], ["cccc"])
    code, out, _ = run("sessions", "list", "--config", config)
    assert code == 0
    assert [line.split("\t")[0] for line in out.splitlines()] == ["bbbb", "aaaa"]
    assert "conversation=key-aaaa" in out and "turns=1" in out
    code, out, _ = run("sessions", "list", "--config", config, "--expired", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["id"] for r in rows] == ["bbbb", "aaaa", "cccc"]
    assert rows[0]["usage"]["input_tokens"] == 3
    code, out, _ = run("sessions", "show", "aaaa", "--config", config)
    assert code == 0 and json.loads(out)["conversation_id"] == "key-aaaa"
    code, out, _ = run("sessions", "drop", "aaaa", "zzzz", "--config", config)
    assert code == 1
    assert out.splitlines() == ["dropped\taaaa", "no such session\tzzzz"]
    code, _, err = run("sessions", "show", "aaaa", "--config", config)
    assert code == 1 and "no session" in err


def test_commands_refuse_a_missing_store_instead_of_creating_one(tmp_path: Path) -> None:
    config = str(write_config(tmp_path))
    code, _, err = run("sessions", "list", "--config", config)
    assert code == 1 and "no session store" in err
    assert not (tmp_path / "state" / "sessions.db").exists()


def droid_session(sessions: Path, session_id: str, cwd: Path, age_s: float) -> list[Path]:
    """A droid session on disk as droid 0.225.2 writes it (one folder per working directory),
    and its working directory."""
    folder = sessions / str(cwd).replace("/", "-")
    folder.mkdir(parents=True, exist_ok=True)
    cwd.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{session_id}.jsonl", folder / f"{session_id}.settings.json"]
    paths[0].write_text(json.dumps({"type": "session_start", "id": session_id, "cwd": str(cwd)}) + "\n"
                        + json.dumps({"type": "message", "id": "m1"}) + "\n")
    paths[1].write_text("{}")
    aged(age_s, *paths, cwd)
    return paths


def aged(age_s: float, *paths: Path) -> None:
    then = time.time() - age_s
    for path in paths:
        os.utime(path, (then, then))


LIVE, EXPIRED, FORGOTTEN, SPARE, OWN, SHARED = (f"{n}{n}{n}{n}{n}{n}{n}{n}-0000-4000-8000-000000000000" for n in "123456")


def test_prune_files_deletes_only_unreachable_sessions_of_droidpools_workers(tmp_path: Path) -> None:
    config = str(write_config(tmp_path))
    fill_store(tmp_path, [LIVE], [EXPIRED])
    work = tmp_path / "state" / "work"
    sessions = tmp_path / "home" / ".factory" / "sessions"
    # Each droidpool session works in <worker cwd>/sessions/<name>; older ones in the cwd itself.
    live = droid_session(sessions, LIVE, work / "sessions" / "a", 2 * TTL)
    expired = droid_session(sessions, EXPIRED, work / "sessions" / "b", 2 * TTL)
    forgotten = droid_session(sessions, FORGOTTEN, work / "sessions" / "c", 2 * TTL)
    spare = droid_session(sessions, SPARE, work / "sessions" / "d", 60)  # a warm spare's: too recent
    shared = droid_session(sessions, SHARED, work, 2 * TTL)  # unknown, in the cwd itself
    own = droid_session(sessions, OWN, tmp_path / "someone" / "project", 10 * TTL)  # a user's own
    orphan, fresh = work / "sessions" / "e", work / "sessions" / "f"  # no session file names them
    orphan.mkdir()
    fresh.mkdir()
    aged(2 * TTL, orphan)

    code, out, err = run("sessions", "prune-files", "--config", config)
    assert code == 0
    assert {tuple(line.split("\t")[1:3]) for line in out.splitlines()} == {
        (EXPIRED, "expired"), (FORGOTTEN, "unknown"), (SHARED, "unknown"),
        (str(work / "sessions" / "b"), "working directory"), (str(work / "sessions" / "c"), "working directory"),
        (str(orphan), "working directory")}
    assert "dry run" in err
    assert all(p.exists() for p in live + expired + forgotten + spare + own + shared + [orphan])

    code, out, _ = run("sessions", "prune-files", "--config", config, "--apply")
    assert code == 0
    assert not any(p.exists() for p in expired + forgotten + shared)
    assert not any((work / "sessions" / name).exists() for name in "bce")
    assert all(p.exists() for p in live + spare + own + [work / "sessions" / "a", work / "sessions" / "d", fresh])
    assert not expired[0].parent.exists()  # droid's folder for that working directory, now empty

    code, out, _ = run("sessions", "prune-files", "--config", config, "--apply", "--min-age", "0")
    assert {line.split("\t")[1] for line in out.splitlines()} == {SPARE, str(work / "sessions" / "d"), str(fresh)}
    assert all(p.exists() for p in live + own) and (work / "sessions" / "a").exists()
