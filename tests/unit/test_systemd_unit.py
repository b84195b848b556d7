"""The shipped systemd unit, and the credentials it hands over."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from droidpool.config import Config, load
from droidpool.core.access import hash_key, load_keys
from droidpool.droid.launch import worker_env

UNIT = Path(__file__).parents[2] / "systemd" / "droidpool.service"


def service_section() -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    section = None
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def test_unit_runs_as_a_notify_service_with_watchdog_reload_and_drain() -> None:
    unit = service_section()
    assert unit["Type"] == ["notify"]
    assert int(unit["WatchdogSec"][0]) > 0
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["KillMode"] == ["mixed"]
    defaults = Config()
    assert int(unit["TimeoutStopSec"][0]) > defaults.server.drain_grace_s + defaults.pool.stop_grace_s
    assert unit["DynamicUser"] == ["yes"] and unit["StateDirectory"] == ["droidpool"]
    for setting in ("NoNewPrivileges", "PrivateTmp", "ProtectHome", "MemoryDenyWriteExecute", "RestrictNamespaces"):
        assert unit[setting] == ["yes"], setting
    assert unit["ProtectSystem"] == ["strict"]


def test_unit_holds_no_secret() -> None:
    text = UNIT.read_text()
    assert "FACTORY_API_KEY=" not in text and "DROIDPOOL_API_KEY=" not in text
    assert any(c.startswith("factory-api-key:") for c in service_section()["LoadCredential"])


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    droidpool = shutil.which("droidpool") or sys.executable
    unit = tmp_path / "droidpool.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/droidpool", droidpool))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [line for line in result.stderr.splitlines() if str(unit) in line or "droidpool.service" in line]
    assert result.returncode == 0 and not problems, result.stderr


def test_credentials_from_load_credential(tmp_path: Path) -> None:
    (tmp_path / "factory-api-key").write_text("fk-from-credential\n")
    (tmp_path / "api-keys").write_text(f'[[keys]]\nname = "ops"\nsha256 = "{hash_key("k")}"\n')
    environ = {"CREDENTIALS_DIRECTORY": str(tmp_path), "PATH": "/usr/bin"}
    config = load(None, environ=environ, overrides={"server.host": "0.0.0.0"})  # keys exist: allowed
    env = worker_env(config, environ)
    assert env["FACTORY_API_KEY"] == "fk-from-credential"
    assert "CREDENTIALS_DIRECTORY" not in env
    assert [p.name for _, p in load_keys(config, environ)] == ["ops"]
