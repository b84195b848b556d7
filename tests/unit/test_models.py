"""Which model a request names: droid's ids, their short forms, and BYOK names from droid's settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from droidpool import errors
from droidpool.config import load
from droidpool.core.catalog import Catalog
from droidpool.droid.launch import byok_names

LISTED = [
    {"id": "custom:Paced-0", "displayName": "Paced", "isCustom": True, "supportedReasoningEfforts": ["none"]},
    {"id": "claude-opus-4-7", "displayName": "Opus", "isCustom": False, "supportedReasoningEfforts": ["low", "high"]},
]


def service(names: dict[str, str], aliases: dict[str, str] | None = None,
            listed: list[dict[str, Any]] | None = None) -> Catalog:
    return Catalog(lambda: LISTED if listed is None else listed, configured=["custom:pinned"], byok_names=names,
                   aliases=aliases)


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
    assert service({"custom:fake-paced": "Paced", "fake-paced": "Paced"}).resolve(asked) == resolved


def test_unknown_models_and_unsupported_efforts_are_refused() -> None:
    chat = service({})
    with pytest.raises(errors.ModelNotFound):
        chat.resolve("custom:fake-paced")  # no settings: droid's list is all we know
    with pytest.raises(errors.InvalidRequest) as info:
        chat.resolve("claude-opus-4-7", "xhigh")
    assert info.value.param == "reasoning_effort"
    assert chat.resolve("claude-opus-4-7", "high") == "claude-opus-4-7"


def test_aliases_map_client_names_exact_first_then_globs_in_order() -> None:
    catalog = service({}, aliases={"claude-opus-5-5": "custom:Paced", "claude-*": "claude-opus-4-7",
                                   "claude-haiku-*": "custom:Paced-0", "gpt-x": "nonexistent"})
    assert catalog.resolve("claude-opus-5-5") == "custom:Paced-0"  # exact, then droid's short form
    assert catalog.resolve("claude-haiku-4") == "claude-opus-4-7"  # the first glob that matches wins
    assert catalog.resolve("custom:Paced-0") == "custom:Paced-0"
    with pytest.raises(errors.ModelNotFound) as info:
        catalog.resolve("gpt-x")
    assert "alias of 'nonexistent'" in info.value.message
    listing = {m.id: m.alias_of for m in catalog.listing()}
    assert listing["claude-opus-5-5"] == "custom:Paced-0"  # exact aliases are listed, globs and broken ones not
    assert "claude-*" not in listing and "gpt-x" not in listing
    assert listing["custom:Paced-0"] is None


def test_before_droid_answers_any_name_passes_through_its_alias() -> None:
    catalog = service({}, aliases={"claude-*": "custom:x"}, listed=[])
    catalog.configured = ()
    assert catalog.resolve("claude-3") == "custom:x"
    assert catalog.resolve("anything") == "anything"
