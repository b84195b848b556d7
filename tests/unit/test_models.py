"""Which model a request names: droid's ids, their short forms, and BYOK names from droid's settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from droidpool import errors
from droidpool.api.openai_chat import ChatRequest
from droidpool.config import load
from droidpool.core.conversation import ChatMessage
from droidpool.core.turns import ChatService
from droidpool.droid.launch import byok_names

LISTED = [
    {"id": "custom:Paced-0", "displayName": "Paced", "isCustom": True, "supportedReasoningEfforts": ["none"]},
    {"id": "claude-opus-4-7", "displayName": "Opus", "isCustom": False, "supportedReasoningEfforts": ["low", "high"]},
]


class FakePool:
    available_models: list[dict[str, Any]] = LISTED


def service(names: dict[str, str]) -> ChatService:
    return ChatService(FakePool(), None, None, first_token_s=1, turn_s=1, interrupt_grace_s=1,  # type: ignore[arg-type]
                       configured_models=["custom:pinned"], model_names=names)


def request(model: str, effort: str | None = None) -> ChatRequest:
    return ChatRequest(model, (ChatMessage("user", "hi"),), reasoning_effort=effort)


def test_byok_names_come_from_droids_settings(tmp_path: Path) -> None:
    factory = tmp_path / ".factory"
    factory.mkdir()
    (factory / "settings.json").write_text(json.dumps({"customModels": [
        {"model": "fake-paced", "displayName": "Paced", "baseUrl": "http://127.0.0.1:1/v1", "apiKey": "x"}]}))
    config = load(None, environ={}, overrides={"droid.home": str(tmp_path)})
    assert byok_names(config) == {"custom:fake-paced": "Paced", "fake-paced": "Paced"}
    assert byok_names(load(None, environ={}, overrides={"droid.home": str(tmp_path / "none")})) == {}


@pytest.mark.parametrize(
    ("asked", "resolved"),
    [("custom:Paced-0", "custom:Paced-0"), ("custom:Paced", "custom:Paced-0"), ("custom:fake-paced", "custom:Paced-0"),
     ("fake-paced", "custom:Paced-0"), ("claude-opus-4-7", "claude-opus-4-7"), ("custom:pinned", "custom:pinned")],
)
def test_every_name_droid_accepts_resolves_to_its_id(asked: str, resolved: str) -> None:
    assert service({"custom:fake-paced": "Paced", "fake-paced": "Paced"}).resolve_model(request(asked)) == resolved


def test_unknown_models_and_unsupported_efforts_are_refused() -> None:
    chat = service({})
    with pytest.raises(errors.ModelNotFound):
        chat.resolve_model(request("custom:fake-paced"))  # no settings: droid's list is all we know
    with pytest.raises(errors.InvalidRequest) as info:
        chat.resolve_model(request("claude-opus-4-7", "xhigh"))
    assert info.value.param == "reasoning_effort"
    assert chat.resolve_model(request("claude-opus-4-7", "high")) == "claude-opus-4-7"
