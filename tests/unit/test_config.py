"""Configuration layers, validation messages, and the shipped droidpool.toml."""

from __future__ import annotations

from pathlib import Path

import pytest

from droidpool.cli import render_default_config
from droidpool.config import Config, ConfigError, load

REPO = Path(__file__).parents[2]


def test_precedence_defaults_file_env_cli(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[server]\nport = 9000\nhost = \"127.0.0.1\"\n[pool]\nmax_workers = 6\n")
    config = load(path, environ={"DROIDPOOL_SERVER_PORT": "9001", "DROIDPOOL_POOL_QUEUE_SIZE": "3"},
                  overrides={"server.port": 9002})
    assert config.server.port == 9002
    assert config.pool.max_workers == 6
    assert config.pool.queue_size == 3
    assert config.droid.autonomy == "off"


def test_models_table_and_env_table(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[pool]\nmodels = [{id = "custom:a", spares = 2}]\n[droid]\nenv = {FOO = "bar"}\n')
    config = load(path, environ={})
    assert config.pool.models[0].id == "custom:a" and config.pool.models[0].spares == 2
    assert dict(config.droid.env) == {"FOO": "bar"}


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[server]\nport = \"x\"\n", "server.port must be an integer"),
        ("[server]\nport = 70000\n", "server.port must be between 0 and 65535"),
        ("[droid]\nautonomy = \"max\"\n", "droid.autonomy must be one of"),
        ("[pool]\nmax_workers = -1\n", "pool.max_workers must be 0 (automatic) or more"),
        ("[pool]\nidle_min = 3\nidle_max = 2\n", "pool.idle_max must be at least pool.idle_min"),
        ("[pool]\nbogus = 1\n", "unknown key pool.bogus"),
        ("[nope]\nx = 1\n", "unknown section [nope]"),
        ("[server]\nhost = \"0.0.0.0\"\n", "not a loopback address"),
        ("[pool]\nmodels = [{spares = 1}]\n", "needs an entry 'id'"),
        ("not toml [", "not valid TOML"),
    ],
)
def test_bad_values_are_refused_naming_key_and_file(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(path, environ={})
    assert needle in str(info.value)
    assert str(path) in str(info.value)


def test_env_errors_name_the_environment() -> None:
    with pytest.raises(ConfigError, match="environment: pool.max_workers"):
        load(None, environ={"DROIDPOOL_POOL_MAX_WORKERS": "many"})


def test_non_loopback_needs_explicit_opt_in() -> None:
    assert load(None, environ={}, overrides={"server.host": "0.0.0.0", "server.allow_non_loopback": True}).server.host == "0.0.0.0"


def test_shipped_config_is_the_generated_default() -> None:
    shipped = REPO / "droidpool.toml"
    assert shipped.read_text() == render_default_config(), "run: droidpool init --force"
    assert load(shipped, environ={}) == Config()
