"""Claude Code and Codex CLI with images, through droidpool → the real droid → the fake LLM: an image
in the prompt, and a PNG the CLI reads with its own tool (Claude Code's Read, Codex's view_image)
and returns in a tool result, the case that used to fail with "400 ... only text is supported in
tool results".

The fake LLM (scenario ``tools``, model ``custom:fake-vision-tools``, which droid lets see images)
calls the tool named in ``[[call:NAME:{json}]]``, then answers ``Tool said: <result> [+N image(s)]``,
counting the images droid sends after the tool results in its "Image content from tool result:"
user message. The CLIs come from npm (tests/run.sh: DROIDPOOL_TEST_CLAUDE, DROIDPOOL_TEST_CODEX).
"""

from __future__ import annotations

import base64
import json
import os
import struct
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import media
from tests.conftest import Daemon, FakeLLMProcess, start_daemon, write_droid_home

pytestmark = pytest.mark.real_droid
MODEL = "custom:fake-vision-tools"
CLI_TIMEOUT_S = 120
TOOL_IMAGE_MARK = "Image content from tool result:"
CLAUDE_ENV = {"ANTHROPIC_API_KEY": "sk-unused", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
              "DISABLE_AUTOUPDATER": "1"}


def agent(variable: str) -> str:
    path = os.environ.get(variable, "")
    if not (path and os.access(path, os.X_OK)):
        if os.environ.get("CI"):
            pytest.fail(f"{variable} must name the installed CLI in CI; tests/run.sh installs it from npm")
        pytest.skip(f"{variable} not set: the agent CLI is not installed")
    return path


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, real_droid: str, fake_llm: FakeLLMProcess) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("agents-attachments")
    home = write_droid_home(tmp / "home", fake_llm.url)
    daemon = start_daemon(tmp, {
        "droid": {"binary": real_droid, "home": str(home), "airgap": True},
        "pool": {"max_workers": 2, "models": [{"id": MODEL}], "idle_min": 1},
        # The names the CLIs ask for (their main and side models), all to the scripted LLM that sees images.
        "models": {"aliases": {"claude-*": MODEL, "droid-1": MODEL, "blind-1": "custom:fake-tools"}},
        "deadlines": {"first_token_s": 30.0, "turn_s": 90.0},
    }, ready_timeout=60)
    yield daemon
    assert daemon.stop() == 0, daemon.log()


def run(argv: list[str], cwd: Path, env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "NO_PROXY": "127.0.0.1,localhost", "LANG": "C.UTF-8"}
    return subprocess.run(argv, check=False, cwd=cwd, env={**base, **env}, input=stdin,
                          stdin=subprocess.DEVNULL if stdin is None else None, capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S)


def dirs(tmp_path: Path) -> tuple[Path, Path]:
    work, home = tmp_path / "project", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    return work, home


def tag() -> str:
    return uuid.uuid4().hex[:10]


def parts(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message["content"]
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


def png_sizes(message: dict[str, Any]) -> list[tuple[int, int]]:
    """The width and height of each image_url part of an upstream message, each checked to be a whole PNG."""
    sizes = []
    for part in parts(message):
        if part.get("type") != "image_url":
            continue
        head, _, data = part["image_url"]["url"].partition(",")
        assert head == "data:image/png;base64", head
        raw = base64.b64decode(data, validate=True)
        assert raw.startswith(b"\x89PNG\r\n\x1a\n") and raw[12:16] == b"IHDR" and raw[-8:-4] == b"IEND"
        sizes.append(struct.unpack(">II", raw[16:24]))
    return sizes


def last_request(fake_llm: FakeLLMProcess, marker: str) -> list[dict[str, Any]]:
    requests = fake_llm.answer_requests(marker)
    assert requests, f"no upstream request mentions {marker}"
    return list(requests[-1]["messages"])


def assert_tool_image(messages: list[dict[str, Any]], tool: str, size: tuple[int, int]) -> None:
    """The LLM's call of ``tool``, its result, then droid's user message with the result's image."""
    assert [m["role"] for m in messages[-3:]] == ["assistant", "tool", "user"], [m["role"] for m in messages]
    assert messages[-3]["tool_calls"][0]["function"]["name"] == f"droidpool-github___{tool}"
    assert messages[-2]["tool_call_id"] == messages[-3]["tool_calls"][0]["id"]
    assert parts(messages[-1])[0] == {"type": "text", "text": TOOL_IMAGE_MARK}
    assert png_sizes(messages[-1]) == [size]


def test_claude_code_sends_an_image_in_its_prompt(daemon: Daemon, fake_llm: FakeLLMProcess, tmp_path: Path) -> None:
    claude = agent("DROIDPOOL_TEST_CLAUDE")
    work, home = dirs(tmp_path)
    marker = tag()
    text = f"What is in this picture? {marker}"
    message = {"type": "user", "message": {"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": media.b64(media.png(40, 30, seed=21))}},
        {"type": "text", "text": text}]}}
    done = run([claude, "-p", "--input-format", "stream-json", "--output-format", "stream-json", "--verbose",
                "--model", "claude-sonnet-4-5"], work,
               {"HOME": str(home), "ANTHROPIC_BASE_URL": daemon.base_url, **CLAUDE_ENV}, stdin=json.dumps(message) + "\n")
    assert done.returncode == 0, (done.stdout, done.stderr, daemon.log()[-4000:])
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["type"] == "result" and result["is_error"] is False and result["result"] == "No tool needed."
    last = last_request(fake_llm, marker)[-1]
    assert last["role"] == "user" and png_sizes(last) == [(40, 30)]
    # Claude Code adds its own notes (system reminders, the image's cache path) around the user's
    # words; droidpool gives droid one text.
    assert parts(last)[-1]["type"] == "text" and text in parts(last)[-1]["text"]


def test_claude_code_reads_a_png_with_its_read_tool(daemon: Daemon, fake_llm: FakeLLMProcess, tmp_path: Path) -> None:
    claude = agent("DROIDPOOL_TEST_CLAUDE")
    work, home = dirs(tmp_path)
    (work / "plot.png").write_bytes(media.png(64, 48, seed=22))
    marker = tag()
    prompt = f'Describe plot.png {marker} [[call:Read:{{"file_path": "{work / "plot.png"}"}}]]'
    done = run([claude, "-p", prompt, "--model", "claude-sonnet-4-5", "--allowedTools", "Read",
                "--output-format", "json"], work,
               {"HOME": str(home), "ANTHROPIC_BASE_URL": daemon.base_url, **CLAUDE_ENV})
    assert done.returncode == 0, (done.stdout, done.stderr, daemon.log()[-4000:])
    result = json.loads(done.stdout)
    assert result["is_error"] is False and result["num_turns"] == 2, result
    # Read's tool result held the image (and a text note); the LLM saw the image and answered.
    assert result["result"].startswith("Tool said: ") and result["result"].endswith(" [+1 image(s)]")
    assert_tool_image(last_request(fake_llm, marker), "Read", (64, 48))
    log = daemon.log()
    assert '"calls": ["Read"], "event": "turn.parked"' in log and '"event": "turn.resumed"' in log
    assert "only text is supported" not in log + done.stdout + done.stderr


def test_claude_code_reads_a_png_for_a_model_that_cannot_see_it(
        daemon: Daemon, fake_llm: FakeLLMProcess, tmp_path: Path) -> None:
    """droid lists the model with noImageSupport: the tool's image is not refused (the agent would be
    stuck on it), droid is told in its place that it is not shown, and the conversation goes on."""
    claude = agent("DROIDPOOL_TEST_CLAUDE")
    work, home = dirs(tmp_path)
    (work / "plot.png").write_bytes(media.png(64, 48, seed=23))
    marker = tag()
    prompt = f'Describe plot.png {marker} [[call:Read:{{"file_path": "{work / "plot.png"}"}}]]'
    done = run([claude, "-p", prompt, "--model", "blind-1", "--allowedTools", "Read", "--output-format", "json"],
               work, {"HOME": str(home), "ANTHROPIC_BASE_URL": daemon.base_url, **CLAUDE_ENV})
    assert done.returncode == 0, (done.stdout, done.stderr, daemon.log()[-4000:])
    result = json.loads(done.stdout)
    assert result["is_error"] is False and result["num_turns"] == 2, result
    assert "is not shown: this model does not support image inputs" in result["result"]
    upstream = json.dumps(last_request(fake_llm, marker))
    assert "image_url" not in upstream


def codex_home(tmp_path: Path, daemon: Daemon) -> Path:
    home = tmp_path / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text(f"""\
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
    return home


def run_codex(daemon: Daemon, tmp_path: Path, work: Path, args: list[str]) -> subprocess.CompletedProcess[str]:
    codex = agent("DROIDPOOL_TEST_CODEX")
    # No sandbox: bubblewrap needs user namespaces, which CI machines may lack; the commands are ours.
    return run([codex, "exec", "--skip-git-repo-check", "--dangerously-bypass-approvals-and-sandbox", *args], work,
               {"HOME": str(tmp_path), "CODEX_HOME": str(codex_home(tmp_path, daemon)),
                "DROIDPOOL_API_KEY": "sk-unused"})


def test_codex_sends_an_image_given_with_image(daemon: Daemon, fake_llm: FakeLLMProcess, tmp_path: Path) -> None:
    work, _ = dirs(tmp_path)
    (work / "plot.png").write_bytes(media.png(50, 40, seed=23))
    marker = tag()
    text = f"What is in the picture? {marker}"
    done = run_codex(daemon, tmp_path, work, [f"--image={work / 'plot.png'}", text])  # input_image in Responses
    assert done.returncode == 0, (done.stdout, done.stderr, daemon.log()[-4000:])
    assert "No tool needed." in done.stdout
    sent = last_request(fake_llm, marker)
    with_image = [m for m in sent if m["role"] == "user" and png_sizes(m)]
    assert [png_sizes(m) for m in with_image] == [[(50, 40)]]
    assert text in json.dumps(sent[-1])


def test_codex_views_a_png_with_its_view_image_tool(daemon: Daemon, fake_llm: FakeLLMProcess, tmp_path: Path) -> None:
    work, _ = dirs(tmp_path)
    (work / "plot.png").write_bytes(media.png(50, 40, seed=24))
    marker = tag()
    prompt = f'Look at plot.png {marker} [[call:view_image:{{"path": "{work / "plot.png"}"}}]]'
    done = run_codex(daemon, tmp_path, work, [prompt])  # the image comes back in a function_call_output
    assert done.returncode == 0, (done.stdout, done.stderr, daemon.log()[-4000:])
    assert "Tool said: " in done.stdout and "[+1 image(s)]" in done.stdout
    assert_tool_image(last_request(fake_llm, marker), "view_image", (50, 40))
    assert '"calls": ["view_image"], "event": "turn.parked"' in daemon.log()
