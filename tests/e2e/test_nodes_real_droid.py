"""Three droidpool nodes on one PostgreSQL server, each with its own real droid and droid HOME:
a conversation moves between them, survives the SIGKILL of the node that held it with its whole
history (droid's session files come back from the store), and a key's budget holds on every node."""

from __future__ import annotations

import json
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from droidpool.core.access import hash_key
from tests.conftest import Daemon, FakeLLMProcess, free_port, start_daemon, write_droid_home

pytestmark = pytest.mark.real_droid
PACED = "custom:fake-paced"
SECRET = "three-nodes-share-this-secret"


def start_node(tmp: Path, name: str, url: str, real_droid: str, llm: FakeLLMProcess) -> Daemon:
    root = tmp / name
    home = write_droid_home(root / "home", llm.url)  # a droid HOME of its own, as on another host
    port = free_port()
    keys = root / "keys.toml"
    keys.write_text(f'[[keys]]\nname = "team"\nsha256 = "{hash_key("team-secret")}"\n'
                    f'[[keys]]\nname = "capped"\nsha256 = "{hash_key("capped-secret")}"\n')
    sections = {
        "server": {"port": port},
        "droid": {"binary": real_droid, "home": str(home), "airgap": True},
        "pool": {"models": [{"id": PACED}], "max_workers": 2, "idle_min": 1},
        "deadlines": {"first_token_s": 20.0, "turn_s": 60.0},
        "pricing": {"multipliers": {"custom:*": 1.0}},
        "budgets": {"limits": [{"window": "5h", "limit": 10.0, "key": "capped"}]},
        "auth": {"keys_file": str(keys)},
        "nodes": {"url": f"http://127.0.0.1:{port}", "id": name, "heartbeat_s": 0.5, "dead_after_s": 3.0},
    }
    return start_daemon(root, sections, ready_timeout=60,
                        env={"DROIDPOOL_STORE_URL": json.dumps(url), "DROIDPOOL_NODES_SECRET": json.dumps(SECRET)})


@pytest.fixture
def cluster(tmp_path: Path, real_droid: str, fake_llm: FakeLLMProcess, postgres_server: Any
            ) -> Iterator[dict[str, Daemon]]:
    url = postgres_server.database()
    nodes: dict[str, Daemon] = {}
    try:
        for name in ("a", "b", "c"):
            nodes[name] = start_node(tmp_path, name, url, real_droid, fake_llm)
        yield nodes
    finally:
        for node in nodes.values():
            if node.process.poll() is None:
                assert node.stop() == 0, node.log()


def client(node: Daemon, key: str = "team-secret") -> openai.OpenAI:
    return openai.OpenAI(base_url=node.base_url + "/v1", api_key=key, max_retries=0, timeout=60)


def say(node: Daemon, history: list[dict[str, str]], text: str) -> tuple[str, Any]:
    history.append({"role": "user", "content": text})
    raw = client(node).chat.completions.with_raw_response.create(model=PACED, messages=history)  # type: ignore[arg-type]
    answer = raw.parse().choices[0].message.content or ""
    history.append({"role": "assistant", "content": answer})
    return answer, raw.headers


@pytest.mark.timeout(240)
def test_three_nodes_carry_a_conversation_through_a_node_death(cluster: dict[str, Daemon],
                                                               fake_llm: FakeLLMProcess) -> None:
    a, b, c = cluster["a"], cluster["b"], cluster["c"]
    tag = uuid.uuid4().hex[:8]
    history: list[dict[str, str]] = []
    _, headers = say(a, history, f"first {tag}, remember the word ORCHID")
    session = headers["X-Session-Id"]
    _, headers = say(b, history, f"second {tag}")  # a stateless resend to b: forwarded to a
    assert headers["X-Droidpool-Node"] == "a" and headers["X-Session-Id"] == session
    _, headers = say(c, history, f"third {tag}")
    assert headers["X-Droidpool-Node"] == "a" and headers["X-Session-Id"] == session

    a.process.send_signal(signal.SIGKILL)
    a.process.wait(timeout=10)
    _, headers = say(b, history, f"fourth {tag}")
    assert "X-Droidpool-Node" not in headers and headers["X-Session-Id"] == session  # b took it over
    upstream = fake_llm.answer_requests(f"fourth {tag}")[-1]["messages"]
    seen = json.dumps(upstream)
    for turn in ("first", "second", "third"):
        assert f"{turn} {tag}" in seen, f"b's droid lacks the {turn} turn"  # the whole history, restored
    assert "ORCHID" in seen
    _, headers = say(c, history, f"fifth {tag}")  # c now forwards to b
    assert headers["X-Droidpool-Node"] == "b" and headers["X-Session-Id"] == session

    # the capped key's budget holds across the nodes: spent on b, refused on c
    client(b, "capped-secret").chat.completions.create(model=PACED, messages=[{"role": "user", "content": "spend"}])
    with pytest.raises(openai.RateLimitError) as refused:
        client(c, "capped-secret").chat.completions.create(model=PACED, messages=[{"role": "user", "content": "more"}])
    assert refused.value.code == "insufficient_quota"

    # no session mapping was lost: every node sees the conversation's one session, and its turns
    for node in (b, c):
        listed = client(node).get("/sessions", cast_to=object)
        assert [s["id"] for s in listed["data"]] == [session]  # type: ignore[index]
        assert listed["data"][0]["turns"] == 5  # type: ignore[index]
