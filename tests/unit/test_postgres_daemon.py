"""A daemon on the shared PostgreSQL store: turns, sessions and the ledger there, through HTTP and
the command line, with the password kept out of the config file and the logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from tests.conftest import FAKE_DROID, start_daemon

MODEL = "custom:fake-model"


def post(port: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[dict[str, Any], Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response), response.headers


def test_a_daemon_keeps_its_sessions_and_ledger_in_postgres(tmp_path: Path, postgres_server: Any) -> None:
    url = postgres_server.database()
    (tmp_path / "home").mkdir()
    sections = {"droid": {"binary": str(FAKE_DROID), "home": str(tmp_path / "home")},
                "pool": {"models": [{"id": MODEL}], "max_workers": 2},
                "pricing": {"multipliers": {MODEL: 2.0}}}
    env = {"DROIDPOOL_STORE_URL": json.dumps(url)}  # a TOML string: the password stays out of the file
    daemon = start_daemon(tmp_path, sections, env=env)
    try:
        history = [{"role": "user", "content": "hello [[usage:100,10]]"}]
        answer, headers = post(daemon.port, {"model": MODEL, "messages": history})
        session = headers["X-Session-Id"]
        history += [{"role": "assistant", "content": answer["choices"][0]["message"]["content"]},
                    {"role": "user", "content": "again [[usage:100,10]]"}]
        again, headers = post(daemon.port, {"model": MODEL, "messages": history})
        assert headers["X-Session-Id"] == session  # the stateless resend found its session in PostgreSQL
        assert "[turns=2]" in again["choices"][0]["message"]["content"]
        status, usage = daemon.get("/v1/usage")
        assert status == 200 and usage["total"]["turns"] == 2 and usage["total"]["standard_tokens"] == 440
    finally:
        assert daemon.stop() == 0, daemon.log()
    assert postgres_server.password not in daemon.log()
    assert postgres_server.password not in (tmp_path / "droidpool.toml").read_text()
    cli_env = {**{k: v for k, v in os.environ.items() if not k.startswith("DROIDPOOL_")}, **env}
    done = subprocess.run([sys.executable, "-m", "droidpool", "sessions", "list", "--json", "--config",
                           str(tmp_path / "droidpool.toml")], capture_output=True, text=True, timeout=30, env=cli_env,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["id"] for line in done.stdout.splitlines()] == [session]
    done = subprocess.run([sys.executable, "-m", "droidpool", "usage", "--json", "--config",
                           str(tmp_path / "droidpool.toml")], capture_output=True, text=True, timeout=30, env=cli_env,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["total"]["input_tokens"] == 200
