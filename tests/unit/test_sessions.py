"""Sessions through the HTTP API with fake droid workers: naming, continuity, failure, deletion,
forks, resume after eviction and restart, isolation."""

from __future__ import annotations

import json
import shutil
import types
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiohttp.test_utils import TestClient

from droidpool.core.access import PUBLIC
from droidpool.core.catalog import Catalog
from droidpool.droid.worker import Worker, WorkerState
from droidpool.pool.pool import Pool
from droidpool.store import SqliteStore
from tests.unit import harness
from tests.unit.harness import turn_row

pytestmark = pytest.mark.anyio
MODEL = "custom:fake-model"
ECHO = "custom:fake-echo"


class ForkingWorker(Worker):
    """The fake droid has no droid.fork_session; this does what the real droid was seen to do:
    copy the active session under a new id, and stay on the original."""

    async def call(self, method: str, params: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        if method != "droid.fork_session":
            return await super().call(method, params, timeout)
        sessions = Path(self.spec.env["HOME"]) / ".fake-droid" / "sessions"
        assert self.session_id is not None
        data = json.loads((sessions / f"{self.session_id}.json").read_text())
        data["id"] = str(uuid.uuid4())
        (sessions / f"{data['id']}.json").write_text(json.dumps(data))
        return {"newSessionId": data["id"]}


@asynccontextmanager
async def served(tmp_path: Path, forking: bool = False, **overrides: Any) -> AsyncIterator[tuple[TestClient, Pool]]:
    factory = (lambda spec, model: ForkingWorker(spec, model)) if forking else None
    async with harness.served(tmp_path, worker_factory=factory, **overrides) as served_app:
        yield served_app


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


async def ask(client: TestClient, messages: list[dict[str, Any]], headers: dict[str, str] | None = None,
              model: str = MODEL, **extra: Any) -> tuple[str, str]:
    """(session id, answer) of a successful non-streaming request."""
    response = await client.post("/v1/chat/completions", json={"model": model, "messages": messages, **extra},
                                 headers=headers or {})
    body = await response.json()
    assert response.status == 200, body
    return response.headers["X-Session-Id"], body["choices"][0]["message"]["content"]


def turns(answer: str) -> int:
    """How many user messages the fake droid's session held when it answered."""
    return int(answer.rsplit("[turns=", 1)[1].rstrip("]"))


def droid_session(tmp_path: Path, session_id: str) -> dict[str, Any]:
    """The fake droid's own record of a session (its history, as droid would send it upstream)."""
    return dict(json.loads((tmp_path / "home" / ".fake-droid" / "sessions" / f"{session_id}.json").read_text()))


def user_texts(tmp_path: Path, session_id: str) -> list[str]:
    return [
        part["text"] for m in droid_session(tmp_path, session_id)["messages"]
        if m["role"] == "user" and m.get("visibility") != "llm_only" for part in m["content"]
        if part.get("type") == "text"
    ]


async def get_session(client: TestClient, session_id: str) -> dict[str, Any]:
    response = await client.get(f"/v1/sessions/{session_id}")
    assert response.status == 200
    return dict(await response.json())


# --- naming a conversation ---------------------------------------------------------------------


async def test_a_conversation_id_is_get_or_create(tmp_path: Path) -> None:
    async with served(tmp_path) as (client, _):
        key = {"X-Conversation-Id": "ticket-42"}
        response = await client.post("/v1/chat/completions", headers=key,
                                     json={"model": MODEL, "messages": [user("one")], "temperature": 0})
        assert response.status == 200
        assert response.headers["X-Conversation-Id"] == "ticket-42"
        assert response.headers["X-Droidpool-Ignored-Params"] == "temperature"
        session = response.headers["X-Session-Id"]
        # Only the new message: droid has the rest.
        again, answer = await ask(client, [user("two")], key)
        assert again == session and turns(answer) == 2
        # The body field wins over the header, and is not reported as ignored.
        response = await client.post("/v1/chat/completions", headers={"X-Conversation-Id": "other"},
                                     json={"model": MODEL, "messages": [user("three")], "conversation_id": "ticket-42"})
        assert response.headers["X-Session-Id"] == session
        assert "X-Droidpool-Ignored-Params" not in response.headers
        record = await get_session(client, session)
        assert record["conversation_id"] == "ticket-42" and record["turns"] == 3
        listed = await (await client.get("/v1/sessions", params={"conversation_id": "ticket-42"})).json()
        assert [s["id"] for s in listed["data"]] == [session]
        # A different id is a different conversation.
        other, answer = await ask(client, [user("one")], {"X-Conversation-Id": "ticket-43"})
        assert other != session and turns(answer) == 1


async def test_a_conversation_id_with_history_sends_only_the_new_turn(tmp_path: Path) -> None:
    async with served(tmp_path) as (client, _):
        key = {"X-Conversation-Id": "full-history-client"}
        session, first = await ask(client, [user("alpha")], key)
        again, _ = await ask(client, [user("alpha"), assistant(first), user("beta")], key)
        assert again == session
        assert user_texts(tmp_path, session) == ["alpha", "beta"]


async def test_concurrent_first_uses_of_a_conversation_id_make_one_session(tmp_path: Path) -> None:
    async with served(tmp_path, **{"pool.max_workers": 4}) as (client, _):
        results: list[tuple[str, str]] = []

        async def one(i: int) -> None:
            results.append(await ask(client, [user(f"hello {i} [[slow:20]]")], {"X-Conversation-Id": "race"}))

        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(one, i)
        assert len({session for session, _ in results}) == 1
        assert sorted(turns(answer) for _, answer in results) == [1, 2, 3, 4, 5]


async def test_a_conversation_id_keeps_its_session_across_models(tmp_path: Path) -> None:
    async with served(tmp_path) as (client, _):
        key = {"X-Conversation-Id": "multi-model"}
        session, _ = await ask(client, [user("first")], key)
        again, answer = await ask(client, [user("second")], key, model=ECHO)
        assert again == session and turns(answer) == 2
        models = [m["modelId"] for m in droid_session(tmp_path, session)["messages"] if m["role"] == "assistant"]
        assert models == [MODEL, ECHO]
        assert (await get_session(client, session))["model"] == ECHO


@pytest.mark.parametrize("bad", ["x" * 201, "tab\there", 7])
async def test_an_unusable_conversation_id_is_400(tmp_path: Path, bad: Any) -> None:
    async with served(tmp_path) as (client, _):
        response = await client.post("/v1/chat/completions",
                                     json={"model": MODEL, "messages": [user("x")], "conversation_id": bad})
        assert response.status == 400
        assert (await response.json())["error"]["param"] == "conversation_id"


async def test_a_session_id_can_adopt_a_free_conversation_id_but_not_a_taken_one(tmp_path: Path) -> None:
    async with served(tmp_path) as (client, _):
        first, _ = await ask(client, [user("a")])
        second, _ = await ask(client, [user("b")], {"X-Conversation-Id": "taken"})
        adopted, answer = await ask(client, [user("a2")], {"X-Session-Id": first, "X-Conversation-Id": "mine"})
        assert adopted == first and turns(answer) == 2
        by_key, answer = await ask(client, [user("a3")], {"X-Conversation-Id": "mine"})
        assert by_key == first and turns(answer) == 3
        response = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": [user("x")]},
                                     headers={"X-Session-Id": first, "X-Conversation-Id": "taken"})
        assert response.status == 409
        assert (await response.json())["error"]["code"] == "conversation_conflict"
        assert (await get_session(client, second))["turns"] == 1


async def test_a_conversation_id_adopts_the_session_its_history_matches(tmp_path: Path) -> None:
    async with served(tmp_path) as (client, _):
        session, answer = await ask(client, [user("stateless start")])
        named, answer2 = await ask(client, [user("stateless start"), assistant(answer), user("now named")],
                                   {"X-Conversation-Id": "late-name"})
        assert named == session and turns(answer2) == 2
        later, answer3 = await ask(client, [user("only the new one")], {"X-Conversation-Id": "late-name"})
        assert later == session and turns(answer3) == 3


# --- stateless history matching -----------------------------------------------------------------


async def test_reformatted_history_continues_but_a_truncated_one_never_does(tmp_path: Path) -> None:
    async with served(tmp_path) as (client, _):
        system = {"role": "system", "content": "be brief"}
        history: list[dict[str, Any]] = [system, user("turn one")]
        session, a1 = await ask(client, history)
        history += [assistant(a1), user("turn two")]
        _, a2 = await ask(client, history)
        # Content parts instead of strings, whitespace padding: still the same conversation.
        history = [system, {"role": "user", "content": [{"type": "text", "text": " turn "}, {"type": "text", "text": "one\n"}]},
                   assistant(a1 + "  "), user("turn two"), assistant(a2), user("turn three")]
        again, a3 = await ask(client, history)
        assert again == session and turns(a3) == 3
        # Resending only turn 1 (and a new question) must not continue the 3-turn session.
        truncated, answer = await ask(client, [system, user("turn one"), assistant(a1), user("what else?")])
        assert truncated != session and turns(answer) == 1
        assert "<conversation>" in user_texts(tmp_path, truncated)[0]
        # An edited answer is another conversation too.
        edited, _ = await ask(client, [system, user("turn one"), assistant(a1 + " (edited)"), user("turn two"),
                                       assistant(a2), user("turn three"), assistant(a3), user("four")])
        assert edited not in (session, truncated)
        # The original still continues with its exact history.
        same, a4 = await ask(client, history + [assistant(a3), user("turn four")])
        assert same == session and turns(a4) == 4


async def test_a_failed_turn_counts_and_a_stateless_retry_starts_clean(tmp_path: Path) -> None:
    async with served(tmp_path) as (client, _):
        session, a1 = await ask(client, [user("hello")])
        history = [user("hello"), assistant(a1)]
        failed = await client.post("/v1/chat/completions",
                                   json={"model": MODEL, "messages": [*history, user("boom [[error:401]]")]})
        assert failed.status == 502 and failed.headers["X-Session-Id"] == session
        record = await get_session(client, session)
        assert (record["turns"], record["failed_turns"], record["diverged"], record["in_flight"]) == (1, 1, True, False)
        # droid's copy now holds the failed message; a stateless retry must not land on it.
        retry, answer = await ask(client, [*history, user("boom, again")])
        assert retry != session and turns(answer) == 1
        assert not any("boom [[error:401]]" in t for t in user_texts(tmp_path, retry))
        # By id, the client asks for that very session, failed message included.
        by_id, answer = await ask(client, [user("by id")], {"X-Session-Id": session})
        assert by_id == session and turns(answer) == 3


async def test_an_interrupted_stream_takes_the_session_off_stateless_matching(tmp_path: Path) -> None:
    async with served(tmp_path) as (client, pool):
        session, a1 = await ask(client, [user("first")])
        response = await client.post("/v1/chat/completions", json={
            "model": MODEL, "stream": True, "messages": [user("first"), assistant(a1), user("long [[slow:300]]")]})
        await response.content.readline()
        response.close()
        with anyio.fail_after(10):
            while (await get_session(client, session))["in_flight"]:
                await anyio.sleep(0.05)
        record = await get_session(client, session)
        assert record["diverged"] and record["failed_turns"] == 1
        retry, _ = await ask(client, [user("first"), assistant(a1), user("long, retried")])
        assert retry != session
        assert pool.counters["crashes"] == 0


# --- deletion ------------------------------------------------------------------------------------


async def test_a_deleted_session_is_unreachable_though_a_worker_still_holds_it(tmp_path: Path) -> None:
    async with served(tmp_path) as (client, pool):
        session, a1 = await ask(client, [user("secret plans")], {"X-Conversation-Id": "to-delete"})
        assert any(w.session_id == session and w.state is WorkerState.IDLE for w in pool.workers)
        assert (await client.delete(f"/v1/sessions/{session}")).status == 200
        assert any(w.session_id == session for w in pool.workers)  # still in a worker's memory
        gone = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": [user("x")]},
                                 headers={"X-Session-Id": session})
        assert gone.status == 404 and (await gone.json())["error"]["code"] == "session_not_found"
        resend, answer = await ask(client, [user("secret plans"), assistant(a1), user("go on")])
        assert resend != session and turns(answer) == 1
        by_key, answer = await ask(client, [user("go on")], {"X-Conversation-Id": "to-delete"})
        assert by_key not in (session, resend) and turns(answer) == 1
        assert (await client.get(f"/v1/sessions/{session}")).status == 404


async def test_delete_waits_for_the_running_turn_and_wins_over_requests_queued_behind_it(tmp_path: Path) -> None:
    async with served(tmp_path) as (client, _):
        session, _ = await ask(client, [user("start")])
        results: dict[str, int] = {}

        async def request(name: str, method: str, path: str, body: Any = None) -> None:
            response = await client.request(method, path, json=body, headers={"X-Session-Id": session})
            results[name] = response.status

        chat = {"model": MODEL, "messages": [user("slow [[slow:250]]")]}
        async with anyio.create_task_group() as tg:
            tg.start_soon(request, "running", "POST", "/v1/chat/completions", chat)
            with anyio.fail_after(10):
                while not (await get_session(client, session))["in_flight"]:
                    await anyio.sleep(0.01)
            tg.start_soon(request, "delete", "DELETE", f"/v1/sessions/{session}")
            await anyio.sleep(0.3)  # the DELETE now waits for the session's lock, first in line
            tg.start_soon(request, "queued", "POST", "/v1/chat/completions", chat)
        assert results == {"running": 200, "delete": 200, "queued": 404}


# --- forks ---------------------------------------------------------------------------------------


async def test_a_fork_copies_the_history_and_leaves_the_source_alone(tmp_path: Path) -> None:
    async with served(tmp_path, forking=True) as (client, _):
        source, a1 = await ask(client, [user("shared beginning")])
        response = await client.post(f"/v1/sessions/{source}/fork", json={"conversation_id": "branch"})
        assert response.status == 200
        fork = await response.json()
        assert fork["parent_id"] == source and fork["id"] != source and fork["conversation_id"] == "branch"
        branch, answer = await ask(client, [user("on the branch")], {"X-Conversation-Id": "branch"})
        assert branch == fork["id"] and turns(answer) == 2
        assert user_texts(tmp_path, branch) == ["shared beginning", "on the branch"]
        # A stateless resend of the shared history continues the source, never the fork.
        again, answer = await ask(client, [user("shared beginning"), assistant(a1), user("on the trunk")])
        assert again == source and turns(answer) == 2
        assert user_texts(tmp_path, source) == ["shared beginning", "on the trunk"]
        # A fork without a body; an unknown source.
        plain = await client.post(f"/v1/sessions/{source}/fork")
        assert plain.status == 200 and (await plain.json())["conversation_id"] is None
        missing = await client.post("/v1/sessions/nope/fork")
        assert missing.status == 404
        taken = await client.post(f"/v1/sessions/{source}/fork", json={"conversation_id": "branch"})
        assert taken.status == 409


async def test_a_droid_without_fork_session_gives_502(tmp_path: Path) -> None:
    async with served(tmp_path) as (client, _):
        source, _ = await ask(client, [user("x")])
        response = await client.post(f"/v1/sessions/{source}/fork")
        assert response.status == 502
        assert "fork_session" in (await response.json())["error"]["message"]
        after, answer = await ask(client, [user("still fine")], {"X-Session-Id": source})
        assert after == source and turns(answer) == 2


# --- resume anywhere -----------------------------------------------------------------------------


async def test_a_session_resumes_after_its_worker_was_evicted(tmp_path: Path) -> None:
    async with served(tmp_path, **{"pool.max_workers": 2}) as (client, pool):
        session, a1 = await ask(client, [user("remember the lighthouse")])
        for i in range(4):
            await ask(client, [user(f"unrelated {i}")])
        assert not any(w.session_id == session for w in pool.workers)
        loads = pool.counters["session_loads"]
        again, answer = await ask(client, [user("remember the lighthouse"), assistant(a1), user("what was it?")])
        assert again == session and turns(answer) == 2
        assert pool.counters["session_loads"] == loads + 1


async def test_every_way_of_naming_a_session_survives_a_restart(tmp_path: Path) -> None:
    async with served(tmp_path) as (client, _):
        stateless, a1 = await ask(client, [user("stateless one")])
        by_id, _ = await ask(client, [user("by id one")])
        keyed, _ = await ask(client, [user("keyed one")], {"X-Conversation-Id": "survivor"})
    async with served(tmp_path) as (client, pool):
        assert not any(w.session_id for w in pool.workers if w.state is not WorkerState.READY)
        again, answer = await ask(client, [user("stateless one"), assistant(a1), user("stateless two")])
        assert again == stateless and turns(answer) == 2
        again, answer = await ask(client, [user("by id two")], {"X-Session-Id": by_id})
        assert again == by_id and turns(answer) == 2
        again, answer = await ask(client, [user("keyed two")], {"X-Conversation-Id": "survivor"})
        assert again == keyed and turns(answer) == 2


async def test_a_session_droid_lost_is_forgotten(tmp_path: Path) -> None:
    async with served(tmp_path) as (client, _):
        stateless, a1 = await ask(client, [user("will vanish")])
        named, _ = await ask(client, [user("will vanish too")], {"X-Conversation-Id": "vanishing"})
    shutil.rmtree(tmp_path / "home" / ".fake-droid")  # the fake droid's own record of each session
    shutil.rmtree(tmp_path / "home" / ".factory" / "sessions")  # and the files droidpool minted
    async with served(tmp_path) as (client, _):
        # A stateless client sent the whole history: it just gets a new session.
        fresh, answer = await ask(client, [user("will vanish"), assistant(a1), user("still there?")])
        assert fresh != stateless and turns(answer) == 1
        # A named one is told, once; its next request starts over.
        lost = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": [user("hm")]},
                                 headers={"X-Conversation-Id": "vanishing"})
        assert lost.status == 404 and (await lost.json())["error"]["param"] == "conversation_id"
        anew, answer = await ask(client, [user("again")], {"X-Conversation-Id": "vanishing"})
        assert anew != named and turns(answer) == 1


# --- isolation, usage, listing -------------------------------------------------------------------


async def test_a_new_conversation_never_sees_another_ones_content(tmp_path: Path) -> None:
    async with served(tmp_path, **{"pool.max_workers": 1, "pool.models": [{"id": MODEL}], "pool.idle_min": 0}) as (client, _):
        first, _ = await ask(client, [user("the password is swordfish")])
        await ask(client, [user("the password is swordfish"), assistant("ok"), user("and more")])
        second, answer = await ask(client, [user("what is the password?")])
        assert second != first and turns(answer) == 1
        assert "swordfish" not in json.dumps(droid_session(tmp_path, second))


async def test_usage_accumulates_per_session(tmp_path: Path) -> None:
    async with served(tmp_path) as (client, _):
        session, _ = await ask(client, [user("a [[usage:10,4]]")])
        await ask(client, [user("b [[usage:5,1]]")], {"X-Session-Id": session})
        usage = (await get_session(client, session))["usage"]
        assert (usage["input_tokens"], usage["output_tokens"]) == (15, 5)


async def test_the_session_list_pages(tmp_path: Path) -> None:
    async with served(tmp_path) as (client, _):
        made = [(await ask(client, [user(f"conversation {i}")]))[0] for i in range(5)]
        seen: list[str] = []
        params = {"limit": "2"}
        for _ in range(5):
            page = await (await client.get("/v1/sessions", params=params)).json()
            seen += [s["id"] for s in page["data"]]
            assert page["last_id"] == page["data"][-1]["id"]
            if not page["has_more"]:
                break
            params = {"limit": "2", "after": page["last_id"]}
        assert seen == made[::-1]
        first = (await (await client.get("/v1/sessions")).json())["data"][0]
        assert first["expires_at"] == pytest.approx(first["updated_at"] + 86400)
        for bad in ({"limit": "0"}, {"limit": "1001"}, {"limit": "x"}, {"after": "nope"}):
            response = await client.get("/v1/sessions", params=bad)
            assert response.status == 400
            assert (await response.json())["error"]["param"] == next(iter(bad))



async def test_a_failed_turns_usage_is_counted_without_moving_the_head(tmp_path: Path) -> None:
    from droidpool.core.model import TurnRequest
    from droidpool.core.turn import Deadlines, Turn
    from droidpool.core.parking import Run
    from droidpool.core.recorder import Recorder
    from droidpool.core.service import TurnService
    from droidpool.droid.protocol import TurnCompleted, Usage
    from droidpool.droid.worker import SessionSettings

    class Events:
        """A turn that droid ended unsuccessfully, after spending tokens."""

        def __init__(self) -> None:
            self.events = [TurnCompleted("model_rate_limited", Usage(7, 1, 0, 0, 2))]
            self.completed: TurnCompleted | None = None  # as TurnStream: how droid ended it

        async def __anext__(self) -> TurnCompleted:
            if not self.events:
                raise StopAsyncIteration
            self.completed = self.events.pop()
            return self.completed

    store = SqliteStore(tmp_path / "s.db", 3600)
    await store.open()
    await store.create("s", MODEL)
    await store.complete_turn(turn_row("s", MODEL, Usage(3, 3, 0, 0, 0)), "head-1")
    service = TurnService(types.SimpleNamespace(), store, SessionSettings(), Catalog(list))  # type: ignore[arg-type]
    request = TurnRequest(MODEL, ())
    recorder = Recorder(service.books, request, PUBLIC, "s", MODEL)
    turn = Turn(turn_id="t", session_id="s", model_id=MODEL, request=request, access=PUBLIC,
                worker=types.SimpleNamespace(alive=True), stream=Events(), recorder=recorder,  # type: ignore[arg-type]
                deadlines=Deadlines(5, 5, 1), base="head-1", sent=())
    recorder.run = Run(turn)
    with pytest.raises(Exception) as info:
        async for _ in turn.outputs(1.0):
            pass
    assert getattr(info.value, "status", None) == 429 and turn.result is None
    await recorder.settle()
    record = await store.get("s")
    assert record is not None and record.head_digest == "head-1" and record.failed_turns == 1
    assert record.usage == Usage(10, 4, 0, 0, 2) and record.diverged
    await store.close()
