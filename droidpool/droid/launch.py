"""How a droid worker is launched: its binary, argv, environment, HOME and session defaults."""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

from droidpool.config import ALL_TOOL_IDS, Config

from .spec import LaunchSpec, SessionSettings

DROID_ARGS = ("exec", "--input-format", "stream-jsonrpc", "--output-format", "stream-jsonrpc")


class StartupError(RuntimeError):
    """droidpool cannot start; the message says what to fix."""


def resolve_binary(binary: str) -> str:
    binary = os.path.expanduser(binary)
    found = shutil.which(binary) if os.sep not in binary else (binary if os.access(binary, os.X_OK) else None)
    if found is None:
        raise StartupError(
            f"droid executable {binary!r} not found or not executable; install it "
            "(npm install @factory/cli-linux-x64) and set droid.binary"
        )
    return str(Path(found).resolve())


def worker_env(config: Config, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The workers' environment: ours minus droidpool's own settings, plus droid's knobs."""
    env = {k: v for k, v in (os.environ if environ is None else environ).items() if not k.startswith("DROIDPOOL_")}
    env["FACTORY_LOG_FILE"] = config.droid.log_file
    if config.droid.home:
        env["HOME"] = str(Path(config.droid.home).expanduser())
    if config.droid.airgap:
        env["FACTORY_AIRGAP_ENABLED"] = "1"
    # droid runs `git status` and `git log` in each session's directory to describe it to the
    # LLM: git must not find a repository above droidpool's own working directory.
    env["GIT_CEILING_DIRECTORIES"] = str(config.worker_cwd)
    env.update(config.droid.env)
    # systemd's LoadCredential=factory-api-key:...: the key never sits in the unit or its env.
    credential = credential_path("factory-api-key", env)
    if credential is not None:
        env["FACTORY_API_KEY"] = credential.read_text().strip()
    env.pop("CREDENTIALS_DIRECTORY", None)
    return env


def droid_dir(config: Config) -> Path:
    """The workers' ``.factory`` directory: under FACTORY_HOME_OVERRIDE, else their HOME."""
    env = worker_env(config)
    home = Path(env.get("FACTORY_HOME_OVERRIDE") or env.get("HOME") or "~").expanduser()
    return home / ".factory"


def droid_settings_path(config: Config) -> Path:
    """droid's own settings file for the workers (BYOK custom models live there)."""
    return droid_dir(config) / "settings.json"


def byok_names(config: Config) -> dict[str, str]:
    """BYOK model names droid accepts (``custom:<model>``, ``<model>``) → their display name.

    droid.list_models shows only generated ids (``custom:<displayName>-<n>``); a client may
    well use the name from the settings instead, as droid itself does."""
    try:
        data = json.loads(droid_settings_path(config).read_text())
    except (OSError, ValueError):
        return {}
    names: dict[str, str] = {}
    for entry in data.get("customModels", []) if isinstance(data, dict) else []:
        if isinstance(entry, dict) and isinstance(entry.get("model"), str) and isinstance(entry.get("displayName"), str):
            names.setdefault(f"custom:{entry['model']}", entry["displayName"])
            names.setdefault(entry["model"], entry["displayName"])
    return names


def credential_path(name: str, environ: Mapping[str, str] | None = None) -> Path | None:
    """A systemd credential's file, if the service was given one by that name."""
    directory = (os.environ if environ is None else environ).get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = Path(directory) / name
    return path if path.is_file() else None


# droid 0.225.2 defers MCP tools behind ToolSearch unless the server's name, lower-cased and
# stripped to letters and digits, contains one of a list compiled into the binary:
#   var wo=["github","agentbrowser"];function bo(e){return e.toLowerCase().replace(/[^a-z0-9]/g,"")}
_EXEMPTIONS = re.compile(
    rb'=\[((?:"[a-z0-9]+",?)+)\];function \w+\(e\)\{return e\.toLowerCase\(\)\.replace\(/\[\^a-z0-9\]/g,""\)\}')


def deferral_exemptions(binary: str) -> tuple[str, ...] | None:
    """The MCP server names droid offers tools of directly (read from its binary, ~0.2 s), or
    None when the list is not found (another build, or a wrapper script)."""
    try:
        with open(binary, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            match = _EXEMPTIONS.search(data)
            names = bytes(match.group(1)) if match is not None else None
    except (OSError, ValueError):
        return None
    if names is None:
        return None
    return tuple(name.strip(b'"').decode() for name in names.split(b","))


# The reasons ``agent_turn_completed`` can carry, a string enum in droid 0.225.2's bundle:
#   ((s)=>{s.Completed="completed";...;s.SpecHandoff="spec_handoff";...})(zo||={})
_TURN_END_REASONS = re.compile(
    rb'\(\((\w{1,3})\)=>\{(\1\.Completed="completed";(?:\1\.\w+="[a-z_]+";)*?\1\.SpecHandoff="spec_handoff";'
    rb'(?:\1\.\w+="[a-z_]+";?)*)\}\)')


def turn_end_reasons(binary: str) -> tuple[str, ...] | None:
    """Every reason droid can end a turn with (read from its binary, ~0.2 s), or None when the
    enum is not found (another build, or a wrapper script)."""
    try:
        with open(binary, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            match = _TURN_END_REASONS.search(data)
            body = bytes(match.group(2)) if match is not None else None
    except (OSError, ValueError):
        return None
    if body is None:
        return None
    return tuple(value.decode() for value in re.findall(rb'="([a-z_]+)"', body))


def launch_spec(config: Config) -> LaunchSpec:
    cwd = config.worker_cwd
    cwd.mkdir(parents=True, exist_ok=True)
    return LaunchSpec(
        argv=(resolve_binary(config.droid.binary), *DROID_ARGS),
        env=worker_env(config),
        cwd=str(cwd),
        machine_id=config.droid.machine_id,
        permission_policy=config.droid.permission_policy,
        session_title=None if config.droid.generate_titles else "droidpool",
        sessions_dir=str(droid_dir(config) / "sessions"),
        max_line_bytes=config.pool.max_event_line_bytes,
        stop_grace_s=config.pool.stop_grace_s,
    )


def base_settings(config: Config) -> SessionSettings:
    enabled = set(config.droid.enabled_tools)
    return SessionSettings(
        model_id=None,
        autonomy=config.droid.autonomy,
        disabled_tool_ids=tuple(t for t in ALL_TOOL_IDS if t not in enabled),
    )


