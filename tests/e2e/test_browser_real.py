"""A real browser next to droidpool: headless Chromium, driven over the DevTools protocol, runs
pages on two loopback origins against droidpool with the real droid and no API keys. The allowed
origin streams an answer through a real preflight; nothing the foreign one sends reaches the LLM."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import Daemon, FakeLLMProcess, free_port, start_daemon, write_droid_home

pytestmark = pytest.mark.real_droid
MODEL = "custom:fake-echo"
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--remote-debugging-port=0", "about:blank")


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is needed in CI (.ci/run installs Debian's chromium)")
        pytest.skip("Chromium not installed (apt-get install chromium)")
    return found


@pytest.fixture(scope="module")
def page_origins() -> Iterator[tuple[str, str]]:
    """Two loopback origins serving an empty page: the web UI the operator allows, and another."""
    allowed, foreign = free_port(), free_port()
    yield f"http://127.0.0.1:{allowed}", f"http://127.0.0.1:{foreign}"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, real_droid: str, fake_llm: FakeLLMProcess,
           page_origins: tuple[str, str]) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("browser")
    home = write_droid_home(tmp / "home", fake_llm.url)
    daemon = start_daemon(tmp, {
        "droid": {"binary": real_droid, "home": str(home), "airgap": True},
        "server": {"cors_origins": [page_origins[0]]},
        "pool": {"max_workers": 2},
    }, ready_timeout=60)
    yield daemon
    assert daemon.stop() == 0


@asynccontextmanager
async def pages(origins: tuple[str, str]) -> AsyncIterator[None]:
    async def page(request: web.Request) -> web.Response:
        return web.Response(text="<!doctype html><title>ui</title>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/", page)
    runner = web.AppRunner(app)
    await runner.setup()
    for origin in origins:
        await web.TCPSite(runner, "127.0.0.1", int(origin.rsplit(":", 1)[1])).start()
    try:
        yield
    finally:
        await runner.cleanup()


class Browser:
    """One headless Chromium page, driven over the DevTools protocol."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        call = next(self.ids)
        await self.ws.send_json({"id": call, "method": method, "params": params})
        async with asyncio.timeout(30):
            while True:
                message = await self.ws.receive_json()
                if message.get("id") == call:
                    if "error" in message:
                        raise RuntimeError(f"{method}: {message['error']}")
                    return dict(message.get("result", {}))

    async def open(self, url: str) -> None:
        await self.send("Page.enable")
        await self.send("Page.navigate", url=url)
        async with asyncio.timeout(30):
            while (await self.send("Runtime.evaluate", expression="document.readyState", returnByValue=True)
                   )["result"].get("value") != "complete":
                await asyncio.sleep(0.05)

    async def run(self, script: str) -> Any:
        """Evaluate an async function body in the page; its JSON-able result."""
        result = await self.send("Runtime.evaluate", expression=f"(async () => {{ {script} }})()",
                                 awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(json.dumps(result["exceptionDetails"])[:500])
        return result["result"].get("value")


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    profile = Path(tempfile.mkdtemp(prefix="droidpool-chromium-"))
    process = subprocess.Popen([chromium_path(), f"--user-data-dir={profile}", *CHROMIUM_FLAGS],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("Chromium did not start its DevTools endpoint")
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json") as response:
                target = next(t for t in await response.json() if t["type"] == "page")
            async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                yield Browser(ws)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        shutil.rmtree(profile, ignore_errors=True)


def fetch_script(base: str, body: dict[str, Any], **init: Any) -> str:
    options = {"method": "POST", "body": json.dumps(body), **init}
    return f"""
        try {{
            const response = await fetch({json.dumps(base + "/v1/chat/completions")}, {json.dumps(options)});
            const text = await response.text();
            return {{status: response.status, session: response.headers.get("x-session-id"),
                     type: response.type, text: text}};
        }} catch (error) {{
            return {{failed: String(error)}};
        }}"""


@pytest.mark.anyio
async def test_only_the_allowed_origin_drives_droid_from_a_browser(
    daemon: Daemon, fake_llm: FakeLLMProcess, page_origins: tuple[str, str]
) -> None:
    allowed, foreign = page_origins
    tag = uuid.uuid4().hex[:8]
    chat = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": f"from the web UI {tag}"}]}
    attack = {"model": MODEL, "messages": [{"role": "user", "content": f"from the attacker {tag}"}]}
    async with pages(page_origins), chromium() as browser:
        await browser.open(allowed + "/")
        # Authorization and Content-Type: JSON make this a request the browser preflights.
        answer = await browser.run(fetch_script(daemon.base_url, chat, headers={
            "Content-Type": "application/json", "Authorization": "Bearer anything"}))
        assert answer.get("status") == 200, answer
        assert answer["session"], "X-Session-Id is exposed to the page"
        assert "data: [DONE]" in answer["text"] and "ECHO" in answer["text"]

        await browser.open(foreign + "/")
        # A preflighted request from elsewhere: refused, the page learns nothing.
        preflighted = await browser.run(fetch_script(daemon.base_url, attack, headers={
            "Content-Type": "application/json"}))
        assert "failed" in preflighted, preflighted
        # The CSRF classic: a "simple" text/plain POST, sent without any preflight.
        simple = await browser.run(fetch_script(daemon.base_url, attack, mode="no-cors",
                                                headers={"Content-Type": "text/plain"}))
        assert simple.get("type") == "opaque" or "failed" in simple, simple
        # And from the allowed page, text/plain is refused too (415): only JSON runs a turn.
        await browser.open(allowed + "/")
        plain = await browser.run(fetch_script(daemon.base_url, attack, headers={"Content-Type": "text/plain"}))
        assert plain.get("status") == 415, plain
    assert fake_llm.answer_requests(f"from the web UI {tag}")
    assert not fake_llm.answer_requests(f"from the attacker {tag}")


def test_no_browser_style_request_reaches_the_llm(daemon: Daemon, fake_llm: FakeLLMProcess) -> None:
    """Without API keys: text/plain and form bodies, a foreign Origin, a rebound Host: refused,
    and the real droid never asks the LLM anything for them."""
    import urllib.error
    import urllib.request

    tag = uuid.uuid4().hex[:8]
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": f"sneaky {tag}"}]}).encode()
    attempts = [({"Content-Type": "text/plain"}, 415), ({"Content-Type": "application/x-www-form-urlencoded"}, 415),
                ({"Content-Type": "application/json", "Origin": "http://evil.example"}, 403),
                ({"Content-Type": "application/json", "Host": "evil.example"}, 421)]
    for headers, status in attempts:
        request = urllib.request.Request(daemon.base_url + "/v1/chat/completions", data=body, headers=headers)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=20)
        assert refused.value.code == status, headers
    assert not fake_llm.answer_requests(f"sneaky {tag}")
