"""API keys: authentication, per-key policy, concurrency, and where keys may come from."""

from __future__ import annotations

from pathlib import Path

import pytest

from droidpool import errors
from droidpool.api import openai_wire
from droidpool.config import ConfigError, load
from droidpool.core.access import (
    ANONYMOUS,
    Authenticator,
    Principal,
    effective_autonomy,
    hash_key,
    load_keys,
)


def keys(tmp_path: Path, **environ: str) -> Authenticator:
    file = tmp_path / "keys.toml"
    file.write_text(f'[[keys]]\nname = "from-file"\nsha256 = "{hash_key("file-secret")}"\n')
    config = load(None, environ={}, overrides={
        "auth.keys": [
            {"name": "alice", "sha256": hash_key("alice-secret"), "models": ["m1"], "autonomy": "low", "max_concurrent": 1},
            {"name": "plain", "key": "plain-secret"},
        ],
        "auth.keys_file": str(file),
    })
    return Authenticator(load_keys(config, environ))


def test_no_keys_means_anonymous() -> None:
    auth = Authenticator([])
    assert not auth.enabled
    assert auth.authenticate(None) is ANONYMOUS


def test_keys_from_config_hash_plaintext_file_and_environment(tmp_path: Path) -> None:
    auth = keys(tmp_path, DROIDPOOL_API_KEY="env-secret")
    assert auth.authenticate("Bearer alice-secret").name == "alice"
    assert auth.authenticate("Bearer plain-secret").name == "plain"
    assert auth.authenticate("bearer file-secret").name == "from-file"
    assert auth.authenticate(None, x_api_key="env-secret").name == "env"


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer wrong", "Basic alice-secret", "alice-secret"])
def test_missing_or_wrong_keys_are_401(tmp_path: Path, header: str | None) -> None:
    with pytest.raises(errors.Unauthorized) as info:
        keys(tmp_path).authenticate(header)
    assert info.value.status == 401
    assert info.value.kind == "authentication" and openai_wire.error_body(info.value)[1]["error"]["type"] == "authentication_error"
    assert "alice-secret" not in info.value.message


def test_model_policy() -> None:
    alice = Principal("alice", models=("m1",))
    assert alice.allows_model("m1") and not alice.allows_model("m2")
    assert Principal("any").allows_model("m2")


def test_autonomy_is_capped_by_the_key() -> None:
    low = Principal("k", autonomy="low")
    assert effective_autonomy(low, None, "high") == "off"  # a key's sessions default to off
    assert effective_autonomy(low, "low", "off") == "low"
    with pytest.raises(errors.Forbidden) as info:
        effective_autonomy(low, "high", "off")
    assert info.value.status == 403
    assert effective_autonomy(ANONYMOUS, None, "medium") == "medium"  # no auth: the operator's default
    with pytest.raises(errors.Forbidden):
        effective_autonomy(ANONYMOUS, "high", "off")


def test_concurrency_limit_per_key() -> None:
    auth = Authenticator([(hash_key("k"), Principal("k", max_concurrent=1))])
    principal = auth.authenticate("Bearer k")
    with auth.admit(principal):
        with pytest.raises(errors.Overloaded) as info:
            with auth.admit(principal):
                pass
        assert info.value.status == 429 and info.value.headers()["Retry-After"]
    with auth.admit(principal):  # released
        pass


def test_non_loopback_without_keys_is_refused_unless_explicit() -> None:
    with pytest.raises(ConfigError, match="no API keys"):
        load(None, environ={}, overrides={"server.host": "0.0.0.0"})
    assert load(None, environ={"DROIDPOOL_API_KEY": "x"}, overrides={"server.host": "0.0.0.0"})
    assert load(None, environ={}, overrides={"server.host": "0.0.0.0", "auth.keys": [{"name": "a", "key": "b"}]})
    assert load(None, environ={}, overrides={"server.host": "0.0.0.0", "server.allow_non_loopback": True})


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        ({"name": "a"}, "exactly one of sha256 or key"),
        ({"name": "a", "sha256": "zz"}, "64 hex digits"),
        ({"name": "a", "key": "k", "autonomy": "root"}, "autonomy must be one of"),
        ({"name": "a", "key": "k", "tools": ["rm-rf"]}, "unknown tool ids"),
        ({"key": "k"}, "needs an entry 'name'"),
    ],
)
def test_bad_key_entries_are_refused(entry: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load(None, environ={}, overrides={"auth.keys": [entry]})


def test_a_key_that_is_not_utf8_is_just_a_wrong_key(tmp_path: Path) -> None:
    with pytest.raises(errors.Unauthorized):
        keys(tmp_path).authenticate("Bearer \udce9\udcff")  # the bytes e9 ff, as aiohttp hands them over
    with pytest.raises(errors.Unauthorized):
        keys(tmp_path).authenticate(None, "\udce9")
