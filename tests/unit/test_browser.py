"""Safe next to a web browser: one test per rule (JSON bodies, Host names, origins, CORS); each fails
when its rule is removed. Over fake droid workers; the fake droid logs every request it gets."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio.to_thread
import pytest
from aiohttp.test_utils import TestClient

from droidpool.api import browser
from droidpool.api.browser import BrowserPolicy
from droidpool.pool.pool import Pool
from tests.unit import harness

pytestmark = pytest.mark.anyio
MODEL = harness.MODEL
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "run a turn"}]}
WEB_UI = "http://localhost:3000"


@asynccontextmanager
async def served(tmp_path: Path, **overrides: Any) -> AsyncIterator[tuple[TestClient, Pool]]:
    log = tmp_path / "droid-requests.log"
    overrides = {"droid.env": {"FAKE_DROID_LOG": str(log)}, "server.cors_origins": [WEB_UI], **overrides}
    async with harness.served(tmp_path, **overrides) as served_app:
        yield served_app


def turns_reached_droid(tmp_path: Path) -> int:
    log = tmp_path / "droid-requests.log"
    return log.read_text().count("droid.add_user_message") if log.exists() else 0


# --- content type -----------------------------------------------------------------------------------


async def test_a_text_plain_body_holding_valid_json_is_415_and_reaches_no_droid(tmp_path: Path) -> None:
    async with served(tmp_path) as (client, _):
        for path in ("/v1/chat/completions", "/v1/responses", "/v1/messages"):
            response = await client.post(path, data=json.dumps(CHAT), headers={"Content-Type": "text/plain"})
            assert response.status == 415, path
        body = await (await client.post("/v1/chat/completions", data=json.dumps(CHAT),
                                        headers={"Content-Type": "text/plain;charset=UTF-8"})).json()
        assert body["error"]["code"] == "unsupported_media_type"
        anthropic_body = await (await client.post("/v1/messages", data=json.dumps(CHAT),
                                                  headers={"Content-Type": "text/plain"})).json()
        assert anthropic_body["type"] == "error" and anthropic_body["error"]["type"] == "invalid_request_error"
        assert turns_reached_droid(tmp_path) == 0
        ok = await client.post("/v1/chat/completions", json=CHAT)  # the same request as JSON runs
        assert ok.status == 200 and turns_reached_droid(tmp_path) == 1


async def test_form_and_multipart_bodies_are_415(tmp_path: Path) -> None:
    async with served(tmp_path) as (client, _):
        for content_type in ("application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""):
            response = await client.post("/v1/chat/completions", data=b"model=x&messages=y",
                                         headers={"Content-Type": content_type})
            assert response.status == 415, content_type
        fork = await client.post("/v1/sessions/nope/fork", data=b"a=1",
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert fork.status == 415
        assert turns_reached_droid(tmp_path) == 0


async def test_json_with_a_charset_or_a_json_suffix_is_accepted(tmp_path: Path) -> None:
    async with served(tmp_path) as (client, _):
        for content_type in ("application/json; charset=utf-8", "application/vnd.api+json", "APPLICATION/JSON"):
            response = await client.post("/v1/chat/completions", data=json.dumps(CHAT),
                                         headers={"Content-Type": content_type})
            assert response.status == 200, content_type
        bare = await client.post("/v1/sessions/unknown/fork")  # no body, no type: fine
        assert bare.status == 404


# --- Host (DNS rebinding) ---------------------------------------------------------------------------


async def test_a_foreign_host_is_refused_everywhere_before_any_work(tmp_path: Path) -> None:
    async with served(tmp_path) as (client, _):
        for method, path in [("POST", "/v1/chat/completions"), ("GET", "/v1/sessions"), ("GET", "/v1/models"),
                             ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics"), ("POST", "/v1/messages")]:
            response = await client.request(method, path, json=CHAT, headers={"Host": "evil.example"})
            assert response.status == 421, (method, path)
            body = await response.json()
            error = body["error"]
            assert error["type"] == "invalid_request_error" and "evil.example" in error["message"]
        rebound = await client.get("/v1/models", headers={"Host": "evil.example:8765"})
        assert rebound.status == 421
        assert turns_reached_droid(tmp_path) == 0
        for host in ("localhost", "localhost:8765", "127.0.0.1:8765", "[::1]:8765", "LOCALHOST."):
            assert (await client.get("/v1/models", headers={"Host": host})).status == 200, host


async def test_allowed_hosts_extend_the_loopback_names(tmp_path: Path) -> None:
    async with served(tmp_path, **{"server.allowed_hosts": ["droid.lan"]}) as (client, _):
        assert (await client.get("/healthz", headers={"Host": "droid.lan:8765"})).status == 200
        assert (await client.get("/healthz", headers={"Host": "other.lan"})).status == 421


def test_host_rules_on_loopback_and_public_binds() -> None:
    loopback = BrowserPolicy.of("127.0.0.1", (), ())
    assert browser.host_allowed(loopback, "127.0.0.1:8765") and browser.host_allowed(loopback, "127.1.2.3")
    assert not browser.host_allowed(loopback, "evil.example") and not browser.host_allowed(loopback, None)
    assert not browser.host_allowed(loopback, "127.0.0.1.evil.example")
    public = BrowserPolicy.of("0.0.0.0", (), ())
    assert browser.host_allowed(public, "anything.example:80")
    named = BrowserPolicy.of("0.0.0.0", ["droid.example.com"], ())
    assert browser.host_allowed(named, "droid.example.com") and browser.host_allowed(named, "localhost")
    assert not browser.host_allowed(named, "evil.example")
    assert browser.host_name("[::1]:8765") == "[::1]" and browser.host_name("Example.COM.:443") == "example.com"


# --- Origin and CORS --------------------------------------------------------------------------------


async def test_a_foreign_origin_is_refused_before_any_work(tmp_path: Path) -> None:
    async with served(tmp_path) as (client, _):
        for origin in ("http://evil.example", "null", "http://localhost:3001", "https://localhost:3000"):
            response = await client.post("/v1/chat/completions", json=CHAT, headers={"Origin": origin})
            assert response.status == 403, origin
            assert (await response.json())["error"]["code"] == "origin_not_allowed"
            assert "Access-Control-Allow-Origin" not in response.headers
        assert turns_reached_droid(tmp_path) == 0
        plain = await client.post("/v1/chat/completions", json=CHAT)  # no Origin: curl, SDKs, CLIs
        assert plain.status == 200


async def test_a_preflight_from_a_foreign_origin_gets_no_cors_headers(tmp_path: Path) -> None:
    async with served(tmp_path) as (client, _):
        response = await client.options("/v1/chat/completions", headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert response.status == 403
        assert not [h for h in response.headers if h.lower().startswith("access-control-")]


async def test_an_allowed_origin_gets_working_cors_through_a_preflight_and_a_request(tmp_path: Path) -> None:
    async with served(tmp_path) as (client, _):
        preflight = await client.options("/v1/chat/completions", headers={
            "Origin": WEB_UI, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-session-id"})
        assert preflight.status == 204
        assert preflight.headers["Access-Control-Allow-Origin"] == WEB_UI
        assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
        allowed = {h.strip().lower() for h in preflight.headers["Access-Control-Allow-Headers"].split(",")}
        assert {"authorization", "x-api-key", "anthropic-version", "x-session-id", "x-conversation-id",
                "content-type"} <= allowed
        stream = await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers={"Origin": WEB_UI})
        assert stream.status == 200 and stream.headers["Access-Control-Allow-Origin"] == WEB_UI
        exposed = {h.strip().lower() for h in stream.headers["Access-Control-Expose-Headers"].split(",")}
        assert {"x-session-id", "x-conversation-id", "x-request-id", "x-droidpool-ignored-params",
                "retry-after"} <= exposed
        assert b"[DONE]" in await stream.read()
        error = await client.get("/v1/sessions/unknown", headers={"Origin": WEB_UI})
        assert error.status == 404 and error.headers["Access-Control-Allow-Origin"] == WEB_UI  # readable
        models = await client.get("/v1/models", headers={"Origin": WEB_UI})
        assert models.headers["Vary"] == "Origin"


# --- the clients that are not browsers --------------------------------------------------------------


async def test_curl_with_a_json_content_type_keeps_working(tmp_path: Path) -> None:
    curl = shutil.which("curl")
    if curl is None:
        if os.environ.get("CI"):
            pytest.fail("curl is needed in CI (.ci/run installs it)")
        pytest.skip("curl not installed")
    async with served(tmp_path) as (client, _):
        url = str(client.make_url("/v1/chat/completions"))

        def run(*args: str) -> subprocess.CompletedProcess[str]:  # off the loop that serves the app
            return subprocess.run([curl, "-sS", url, *args], capture_output=True, text=True, timeout=30, check=False)

        result = await anyio.to_thread.run_sync(run, "-H", "Content-Type: application/json", "-d", json.dumps(CHAT))
        assert result.returncode == 0 and json.loads(result.stdout)["object"] == "chat.completion"
        bare = await anyio.to_thread.run_sync(run, "-d", json.dumps(CHAT))
        assert json.loads(bare.stdout)["error"]["code"] == "unsupported_media_type"  # curl's default is a form
