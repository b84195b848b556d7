"""Several nodes on one PostgreSQL store, over fake droid workers: routing decisions, forwarding
to the node holding a session, takeover when it dies, hand-off when it drains."""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from droidpool.core.nodes import route
from droidpool.store.base import NodeRow
from tests.conftest import FAKE_DROID, Daemon, free_port, start_daemon, wait_until

MODEL = "custom:fake-model"
SECRET = "a-shared-node-secret-for-tests"


def test_routing_goes_to_the_live_holder_else_takes_over() -> None:
    now = 1000.0
    nodes = {"a": NodeRow("a", "http://a", 2, 0, now - 1), "b": NodeRow("b", "http://b", 2, 0, now - 30),
             "c": NodeRow("c", "http://c", 2, 0, now, "draining")}
    assert route("me", "me", nodes, now, 10).route == "local"
    decision = route("a", "me", nodes, now, 10)
    assert (decision.route, decision.url) == ("forward", "http://a")
    assert route("b", "me", nodes, now, 10).route == "takeover"  # its heartbeat is too old
    assert route("c", "me", nodes, now, 10).route == "takeover"  # draining: it hands its sessions off
    assert route("gone", "me", nodes, now, 10).route == "takeover"
    assert route(None, "me", nodes, now, 10).route == "takeover"


def chat(node: Daemon, body: dict[str, Any], **headers: str) -> tuple[int, dict[str, Any], Any]:
    request = urllib.request.Request(f"{node.base_url}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response), response.headers
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc), exc.headers


def start_node(tmp: Path, name: str, url: str, home: Path) -> Daemon:
    port = free_port()
    sections = {
        "server": {"port": port},
        "droid": {"binary": str(FAKE_DROID), "home": str(home)},  # one fake-droid store: sessions portable
        "pool": {"models": [{"id": MODEL}], "max_workers": 2},
        "nodes": {"url": f"http://127.0.0.1:{port}", "id": name, "heartbeat_s": 0.3, "dead_after_s": 1.5},
    }
    (tmp / name).mkdir()
    return start_daemon(tmp / name, sections, env={"DROIDPOOL_STORE_URL": json.dumps(url),
                                                   "DROIDPOOL_NODES_SECRET": json.dumps(SECRET)})


@pytest.mark.timeout(120)
def test_a_conversation_follows_its_session_across_nodes(tmp_path: Path, postgres_server: Any) -> None:
    url = postgres_server.database()
    home = tmp_path / "home"
    home.mkdir()
    a = start_node(tmp_path, "a", url, home)
    b = start_node(tmp_path, "b", url, home)
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}
        status, _, headers = chat(a, body, **{"X-Conversation-Id": "conv-1"})
        assert status == 200
        session = headers["X-Session-Id"]
        # through b: forwarded to a, which holds the session's worker
        status, answer, headers = chat(b, {**body, "messages": [{"role": "user", "content": "again"}]},
                                       **{"X-Conversation-Id": "conv-1"})
        assert status == 200, answer
        assert headers["X-Droidpool-Node"] == "a" and headers["X-Session-Id"] == session
        assert "[turns=2]" in answer["choices"][0]["message"]["content"]
        # a forged secret is just a client: no way around the host check or the routing
        status, _, _ = chat(b, body, **{"X-Droidpool-Node-Secret": "wrong", "Host": "10.9.9.9"})
        assert status == 421
        _, ready = b.get("/readyz")
        assert ready["store"] == {"backend": "postgres", "ok": True} and ready["node"]["alive"] == ["a", "b"]

        a.process.send_signal(signal.SIGKILL)  # a dies holding the session
        a.process.wait(timeout=10)
        status, answer, headers = chat(b, {**body, "messages": [{"role": "user", "content": "third"}]},
                                       **{"X-Conversation-Id": "conv-1"})
        assert status == 200, answer
        assert "X-Droidpool-Node" not in headers and headers["X-Session-Id"] == session  # b took it over
        assert "[turns=3]" in answer["choices"][0]["message"]["content"]
        metrics = urllib.request.urlopen(f"{b.base_url}/metrics", timeout=10).read().decode()
        events = {line.split('"')[1]: float(line.split()[-1]) for line in metrics.splitlines()
                  if line.startswith("droidpool_node_events_total{")}
        # if b's view of a was still fresh, it tried a first, could not connect, and took over
        assert events["takeovers"] == 1 and events["forwards"] - events["forward_failures"] == 1

        # b drains (SIGTERM): it hands its sessions off before it exits
        c = start_node(tmp_path, "c", url, home)
        try:
            assert b.stop() == 0, b.log()
            wait_until(lambda: c.get("/readyz")[1]["node"]["alive"] == ["c"], 10, "b to leave")
            status, answer, headers = chat(c, {**body, "messages": [{"role": "user", "content": "fourth"}]},
                                           **{"X-Conversation-Id": "conv-1"})
            assert status == 200 and headers["X-Session-Id"] == session
            assert "[turns=4]" in answer["choices"][0]["message"]["content"]
        finally:
            assert c.stop() == 0, c.log()
    finally:
        for node in (a, b):
            if node.process.poll() is None:
                node.stop()


@pytest.mark.anyio
async def test_session_files_go_to_the_store_as_appended_lines_and_come_back_verbatim(tmp_path: Path) -> None:
    from droidpool.core.nodes import Cluster
    from droidpool.store import SqliteStore

    store = SqliteStore(tmp_path / "s.db", 3600)
    await store.open()
    try:
        here, there = tmp_path / "here" / "sessions", tmp_path / "there" / "sessions"
        folder = here / "-work-s1"
        folder.mkdir(parents=True)
        jsonl, settings = folder / "s1.jsonl", folder / "s1.settings.json"
        cwd = tmp_path / "work" / "s1"
        jsonl.write_bytes(json.dumps({"type": "session_start", "id": "s1", "cwd": str(cwd)}).encode() + b"\n")
        settings.write_bytes(b'{"model": "m"}')
        await store.create("s1", "m")
        a = Cluster(store, "a", "http://a", "s" * 20, here)
        first = await a.save("s1")
        jsonl.write_bytes(jsonl.read_bytes() + b'{"type": "message", "n": 1}\n{"type": "mess')  # droid mid-line
        second = await a.save("s1")
        assert second == len(b'{"type": "message", "n": 1}\n') + len(b'{"model": "m"}')  # only the new whole line
        jsonl.write_bytes(jsonl.read_bytes() + b'age", "n": 2}\n')
        settings.write_bytes(b'{"model": "m2"}')
        await a.save("s1")
        b = Cluster(store, "b", "http://b", "s" * 20, there)
        assert await b.take_over("s1", "a")  # restored into b's own droid HOME
        assert (there / "-work-s1" / "s1.jsonl").read_bytes() == jsonl.read_bytes()
        assert (there / "-work-s1" / "s1.settings.json").read_bytes() == b'{"model": "m2"}'
        assert cwd.is_dir()  # the session's working directory exists for droid
        assert (await store.get("s1")).node_id == "b"  # type: ignore[union-attr]
        assert not await b.take_over("s1", "b")  # already there, byte for byte: nothing to restore
        jsonl.write_bytes(b'{"type": "session_start", "id": "s1"}\n')  # droid rewrote it shorter
        await a.save("s1")
        assert (await store.load_files("s1"))["-work-s1/s1.jsonl"] == jsonl.read_bytes()
        restarted = Cluster(store, "a", "http://a", "s" * 20, here)  # the same node after a crash
        jsonl.write_bytes(jsonl.read_bytes() + b'{"type": "message", "n": 3}\n')
        await restarted.save("s1")  # it learns what is stored, and appends after it
        assert (await store.load_files("s1"))["-work-s1/s1.jsonl"] == jsonl.read_bytes()
        assert first > 0
    finally:
        await store.close()


def test_a_stored_file_name_cannot_escape_the_sessions_directory(tmp_path: Path) -> None:
    from droidpool.droid.sessions import restore_session_files

    with pytest.raises(ValueError):
        restore_session_files(tmp_path / "sessions", {"../../etc/cron.d/x.jsonl": b"{}\n"})


def test_droidpool_nodes_lists_the_registry(tmp_path: Path) -> None:
    import time

    import anyio
    from click.testing import CliRunner

    from droidpool.cli import main
    from droidpool.store import SqliteStore

    async def register() -> None:
        store = SqliteStore(tmp_path / "state" / "sessions.db", 3600)
        await store.open()
        now = time.time()
        await store.heartbeat(NodeRow("a", "http://10.0.0.5:8765", 4, now - 100, now))
        await store.heartbeat(NodeRow("b", "http://10.0.0.6:8765", 4, now - 100, now - 60))
        await store.create("s", "m")
        await store.claim("s", "a")
        await store.close()

    anyio.run(register)
    config = tmp_path / "droidpool.toml"
    config.write_text(f'[server]\nstate_dir = "{tmp_path / "state"}"\n')
    result = CliRunner().invoke(main, ["nodes", "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["id"]: r for r in json.loads(result.output)}
    assert (rows["a"]["state"], rows["a"]["sessions"]) == ("serving", 1) and rows["b"]["state"] == "dead"
    result = CliRunner().invoke(main, ["nodes", "--config", str(config)])
    assert "http://10.0.0.5:8765" in result.output and "dead" in result.output


@pytest.mark.timeout(120)
def test_nodes_racing_on_one_new_conversation_and_a_holder_dying_mid_stream(tmp_path: Path,
                                                                            postgres_server: Any) -> None:
    import threading

    url = postgres_server.database()
    home = tmp_path / "home"
    home.mkdir()
    a = start_node(tmp_path, "a", url, home)
    b = start_node(tmp_path, "b", url, home)
    try:
        # the same new conversation id at both nodes at once: one session, both turns on it
        results: list[tuple[int, str, str, str | None]] = []

        def send(node: Daemon, text: str) -> None:
            status, body, headers = chat(node, {"model": MODEL, "messages": [{"role": "user", "content": text}]},
                                         **{"X-Conversation-Id": "race"})
            results.append((status, headers["X-Session-Id"], body["choices"][0]["message"]["content"],
                            headers.get("X-Droidpool-Node")))

        threads = [threading.Thread(target=send, args=(node, f"hello from {node.port} [[slow:50]]"))
                   for node in (a, b)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert [r[0] for r in results] == [200, 200]
        assert results[0][1] == results[1][1]  # one session
        assert sorted("[turns=1]" in r[2] for r in results) == [False, True]  # one after the other
        (holder_name,) = {r[3] for r in results if r[3] is not None}  # the one that got the other's turn
        holder, relay = (a, b) if holder_name == "a" else (b, a)

        # the holder dies while the other node relays its stream: an in-band error, then the end
        request = urllib.request.Request(
            f"{relay.base_url}/v1/chat/completions",
            json.dumps({"model": MODEL, "stream": True,
                        "messages": [{"role": "user", "content": "slowly [[slow:400]]"}]}).encode(),
            {"Content-Type": "application/json", "X-Conversation-Id": "race"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.headers["X-Droidpool-Node"] == holder_name
            first = response.readline()
            while not first.startswith(b"data: "):
                first = response.readline()
            holder.process.send_signal(signal.SIGKILL)
            rest = response.read().decode()
        assert '"code":"worker_crashed"' in rest.replace(" ", "") and rest.rstrip().endswith("data: [DONE]")
    finally:
        for node in (a, b):
            if node.process.poll() is None:
                node.stop()


def test_droids_own_session_files_are_found_and_restored_byte_for_byte(tmp_path: Path) -> None:
    """Recorded from droid 0.225.2 (tests/fixtures/droid_session): the folder is named after the
    session's cwd, which the first line of its .jsonl holds; droid's .bak copy is not carried."""
    from droidpool.droid.sessions import folder_name, restore_session_files, session_file_paths

    recorded = Path(__file__).parents[1] / "fixtures" / "droid_session"
    session_id = "cabadf2c-b8b5-4d58-919c-0e51bf4844b6"
    files = session_file_paths(recorded, session_id)
    assert sorted(files) == [f"-tmp-rec-work/{session_id}.jsonl", f"-tmp-rec-work/{session_id}.settings.json"]
    start = json.loads(files[f"-tmp-rec-work/{session_id}.jsonl"].read_bytes().split(b"\n", 1)[0])
    assert start["type"] == "session_start" and folder_name(start["cwd"]) == "-tmp-rec-work"
    data = {name: path.read_bytes() for name, path in files.items()}
    # restored elsewhere, with the session's cwd moved under tmp_path for the test
    moved = {name: blob.replace(b'"cwd":"/tmp/rec/work"', f'"cwd":"{tmp_path / "work"}"'.encode(), 1)
             for name, blob in data.items()}
    cwd = restore_session_files(tmp_path / "sessions", moved)
    assert cwd == tmp_path / "work" and cwd.is_dir()
    restored = session_file_paths(tmp_path / "sessions", session_id)
    assert {name: path.read_bytes() for name, path in restored.items()} == moved


@pytest.mark.anyio
async def test_turns_stop_when_the_node_loses_its_locks(tmp_path: Path) -> None:
    """What the store's lock-loss callback does: every running turn is interrupted, in-band."""
    import anyio

    from droidpool.api.context import TURNS
    from tests.unit.harness import served

    async with served(tmp_path) as (client, _):
        service = client.server.app[TURNS]
        async with client.post("/v1/chat/completions", json={
                "model": MODEL, "stream": True, "messages": [{"role": "user", "content": "wait [[hang_mid]]"}]}) as r:
            await r.content.readany()  # the turn runs
            with anyio.fail_after(10):
                while not service._drivers:
                    await anyio.sleep(0.01)
            service._locks_lost()
            with anyio.fail_after(15):
                rest = (await r.content.read()).decode()
        assert '"error"' in rest and rest.rstrip().endswith("data: [DONE]")
        assert service.counters["lock_loss_interrupts"] == 1
        with anyio.fail_after(10):
            while service._drivers:
                await anyio.sleep(0.01)
