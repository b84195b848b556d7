"""Claude Code and Codex CLI as droidpool's clients: each completes a task that needs one of its
own tools, run on this machine, through droidpool → the real droid → the fake LLM that calls it.

The fake LLM calls the tool named in ``[[call:NAME:{json}]]`` (the CLI's own tool, which droid
sees as ``droidpool-github___NAME``), then answers ``Tool said: <result>``. The CLIs come from
npm (tests/run.sh installs them: DROIDPOOL_TEST_CLAUDE, DROIDPOOL_TEST_CODEX).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon, FakeLLMProcess, start_daemon, write_droid_home

pytestmark = pytest.mark.real_droid
MODEL = "custom:fake-tools"
CLI_TIMEOUT_S = 120


def agent(variable: str) -> str:
    path = os.environ.get(variable, "")
    if not (path and os.access(path, os.X_OK)):
        if os.environ.get("CI"):
            pytest.fail(f"{variable} must name the installed CLI in CI; tests/run.sh installs it from npm")
        pytest.skip(f"{variable} not set: the agent CLI is not installed")
    return path


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, real_droid: str, fake_llm: FakeLLMProcess) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("agents")
    home = write_droid_home(tmp / "home", fake_llm.url)
    daemon = start_daemon(tmp, {
        "droid": {"binary": real_droid, "home": str(home), "airgap": True},
        "pool": {"max_workers": 3, "models": [{"id": MODEL}], "idle_min": 1},
        # The names the CLIs ask for (their main and side models), all to the scripted LLM.
        "models": {"aliases": {"claude-*": MODEL, "droid-1": MODEL}},
        "deadlines": {"first_token_s": 30.0, "turn_s": 90.0},
    }, ready_timeout=60)
    yield daemon
    assert daemon.stop() == 0, daemon.log()


def run(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "NO_PROXY": "127.0.0.1,localhost", "LANG": "C.UTF-8"}
    return subprocess.run(argv, cwd=cwd, env={**base, **env}, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=CLI_TIMEOUT_S)


def test_claude_code_runs_its_bash_tool_through_droidpool(daemon: Daemon, tmp_path: Path) -> None:
    claude = agent("DROIDPOOL_TEST_CLAUDE")
    work, home = tmp_path / "project", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    prompt = ('Create made.txt. [[call:Bash:{"command": "echo hi-from-claude > made.txt", '
              '"description": "Create made.txt"}]]')
    done = run([claude, "-p", prompt, "--model", "claude-sonnet-4-5", "--allowedTools", "Bash",
                "--output-format", "json"], work, {
        "HOME": str(home), "ANTHROPIC_BASE_URL": daemon.base_url, "ANTHROPIC_API_KEY": "sk-unused",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1",
    })
    assert done.returncode == 0, (done.stdout, done.stderr, daemon.log()[-4000:])
    assert (work / "made.txt").read_text() == "hi-from-claude\n"  # Claude Code ran its own tool here
    result = json.loads(done.stdout)
    assert result["is_error"] is False and result["num_turns"] == 2
    assert result["result"].startswith("Tool said: ")
    log = daemon.log()
    assert '"calls": ["Bash"], "event": "turn.parked"' in log and '"event": "turn.resumed"' in log


def test_codex_runs_its_shell_tool_through_droidpool(daemon: Daemon, tmp_path: Path) -> None:
    codex = agent("DROIDPOOL_TEST_CODEX")
    work, codex_home = tmp_path / "project", tmp_path / "codex-home"
    work.mkdir()
    codex_home.mkdir()
    (codex_home / "config.toml").write_text(f"""\
model = "droid-1"
model_provider = "droidpool"
check_for_update_on_startup = false
web_search = "disabled"

[analytics]
enabled = false

[feedback]
enabled = false

[model_providers.droidpool]
name = "droidpool"
base_url = "{daemon.base_url}/v1"
wire_api = "responses"
env_key = "DROIDPOOL_API_KEY"
request_max_retries = 1
stream_max_retries = 1
""")
    prompt = 'Create made.txt. [[call:exec_command:{"cmd": "echo hi-from-codex > made.txt"}]]'
    # No sandbox: bubblewrap needs user namespaces, which CI machines may lack; the command is ours.
    done = run([codex, "exec", "--skip-git-repo-check", "--dangerously-bypass-approvals-and-sandbox", prompt], work, {
        "HOME": str(tmp_path), "CODEX_HOME": str(codex_home), "DROIDPOOL_API_KEY": "sk-unused",
    })
    assert done.returncode == 0, (done.stdout, done.stderr, daemon.log()[-4000:])
    assert (work / "made.txt").read_text() == "hi-from-codex\n"  # Codex ran its own tool here
    assert "Tool said: " in done.stdout and "Process exited with code 0" in done.stdout
    log = daemon.log()
    assert '"calls": ["exec_command"], "event": "turn.parked"' in log
