"""What a worker is started with (``LaunchSpec``) and what a droid session is fixed to (``SessionSettings``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class LaunchSpec:
    """How to start a worker; the same for every worker of a pool."""

    argv: Sequence[str]
    env: Mapping[str, str] = field(repr=False)  # holds secrets (FACTORY_API_KEY): never shown
    cwd: str = "."
    machine_id: str = "droidpool"
    permission_policy: str = "cancel"
    session_title: str | None = "droidpool"  # set before the first turn: droid then skips its title LLM call
    sessions_dir: str = ""  # droid's <HOME>/.factory/sessions, where minted sessions go
    max_line_bytes: int = 8 * 1024 * 1024
    stop_grace_s: float = 3.0


@dataclass(frozen=True)
class SessionSettings:
    """What ``droid.initialize_session`` fixes for a session's life (system prompt included)."""

    model_id: str | None = None
    system_prompt: str | None = None
    reasoning_effort: str | None = None
    autonomy: str = "off"
    disabled_tool_ids: tuple[str, ...] = ()

    def init_params(self, machine_id: str, cwd: str) -> dict[str, Any]:
        params: dict[str, Any] = {
            "machineId": machine_id,
            "cwd": cwd,
            "autonomyLevel": self.autonomy,
            "disabledToolIds": list(self.disabled_tool_ids),
        }
        if self.model_id:
            params["modelId"] = self.model_id
        if self.system_prompt:
            params["systemPrompt"] = self.system_prompt
        if self.reasoning_effort:
            params["reasoningEffort"] = self.reasoning_effort
        return params
