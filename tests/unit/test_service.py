"""The daemon as a process, and its command line, with the fake droid."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

from click.testing import CliRunner

from droidpool.cli import main
from tests.conftest import FAKE_DROID, descendants, start_daemon, wait_until


def fake_sections(tmp_path: Path) -> dict[str, dict[str, object]]:
    (tmp_path / "home").mkdir(exist_ok=True)
    return {
        "droid": {"binary": str(FAKE_DROID), "home": str(tmp_path / "home")},
        "pool": {"max_workers": 3, "models": [{"id": "custom:fake-model"}], "idle_min": 2},
    }


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigterm_stops_the_daemon_and_every_worker(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, fake_sections(tmp_path))
    try:
        request = urllib.request.Request(
            daemon.base_url + "/v1/chat/completions",
            data=json.dumps({"model": "custom:fake-model", "messages": [{"role": "user", "content": "hi"}]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=20) as response:
            assert response.status == 200
        workers = wait_until(lambda: [p for p in descendants(daemon.process.pid) if alive(p)], 10, "workers")
        assert len(workers) <= 3
    finally:
        code = daemon.stop()
    assert code == 0
    assert not [p for p in workers if alive(p)]
    log = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
    events = [entry["event"] for entry in log]
    assert events.index("droidpool.listening") < events.index("droidpool.stopping") < events.index("droidpool.stopped")
    summary = next(e for e in log if e["event"] == "turn")
    assert summary["status"] == "ok" and summary["request_id"]


def test_serve_refuses_a_bad_config_naming_key_and_file(tmp_path: Path) -> None:
    config = tmp_path / "droidpool.toml"
    config.write_text("[pool]\nmax_workers = -1\n")
    result = subprocess.run([sys.executable, "-m", "droidpool", "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "pool.max_workers" in result.stderr and str(config) in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_a_missing_droid_binary(tmp_path: Path) -> None:
    config = tmp_path / "droidpool.toml"
    config.write_text(f'[droid]\nbinary = "{tmp_path}/no-droid"\n[server]\nstate_dir = "{tmp_path}/s"\n')
    result = subprocess.run([sys.executable, "-m", "droidpool", "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "not found" in result.stderr and "Traceback" not in result.stderr


def test_init_writes_a_loadable_commented_config(tmp_path: Path) -> None:
    runner = CliRunner()
    target = tmp_path / "out.toml"
    result = runner.invoke(main, ["init", "-o", str(target)])
    assert result.exit_code == 0, result.output
    text = target.read_text()
    assert "# Address to listen on." in text and 'host = "127.0.0.1"' in text
    again = runner.invoke(main, ["init", "-o", str(target)])
    assert again.exit_code != 0 and "exists" in again.output


def test_doctor_and_models_with_a_working_droid(tmp_path: Path) -> None:
    config = tmp_path / "droidpool.toml"
    (tmp_path / "home" / ".factory").mkdir(parents=True)
    (tmp_path / "home" / ".factory" / "settings.json").write_text(json.dumps({"customModels": [{"model": "fake-model"}]}))
    config.write_text(f'[droid]\nbinary = "{FAKE_DROID}"\nhome = "{tmp_path}/home"\n[server]\nstate_dir = "{tmp_path}/s"\n')
    runner = CliRunner()
    doctor = runner.invoke(main, ["doctor", "--config", str(config)])
    assert doctor.exit_code == 0, doctor.output
    assert "[ok] droid version 0.225.2" in doctor.output
    assert "BYOK custom models" in doctor.output and "is writable" in doctor.output
    assert "custom:fake-model" in doctor.output
    models = runner.invoke(main, ["models", "--config", str(config)])
    assert models.exit_code == 0 and "custom:fake-model" in models.output


def test_doctor_fails_without_credentials_and_never_prints_the_key(tmp_path: Path) -> None:
    config = tmp_path / "droidpool.toml"
    (tmp_path / "home").mkdir()
    config.write_text(f'[droid]\nbinary = "{FAKE_DROID}"\nhome = "{tmp_path}/home"\n[server]\nstate_dir = "{tmp_path}/s"\n')
    result = CliRunner().invoke(main, ["doctor", "--config", str(config)], env={"FACTORY_API_KEY": ""})
    assert result.exit_code == 1
    assert "[FAIL] droid has no credentials" in result.output and "fix:" in result.output
    with_key = CliRunner().invoke(main, ["doctor", "--config", str(config)], env={"FACTORY_API_KEY": "fk-very-secret"})
    assert with_key.exit_code == 0, with_key.output
    assert "FACTORY_API_KEY is set" in with_key.output and "fk-very-secret" not in with_key.output


def test_hash_key_prints_the_sha256() -> None:
    import hashlib

    result = CliRunner().invoke(main, ["hash-key", "--key", "s3cret"])
    assert result.output.strip() == hashlib.sha256(b"s3cret").hexdigest()


def test_doctor_reports_what_to_fix(tmp_path: Path) -> None:
    config = tmp_path / "droidpool.toml"
    config.write_text(f'[droid]\nbinary = "{tmp_path}/none"\n')
    result = CliRunner().invoke(main, ["doctor", "--config", str(config)])
    assert result.exit_code == 1
    assert "[FAIL]" in result.output and "fix:" in result.output


def test_serve_reports_a_busy_port(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        (tmp_path / "home").mkdir()
        config = tmp_path / "droidpool.toml"
        config.write_text(f'[droid]\nbinary = "{FAKE_DROID}"\nhome = "{tmp_path}/home"\n'
                          f'[server]\nstate_dir = "{tmp_path}/s"\nport = {port}\n')
        result = subprocess.run([sys.executable, "-m", "droidpool", "serve", "--config", str(config)],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr
