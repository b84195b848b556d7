"""The docs stay true to the code: the README's configuration table is the config's."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

from droidpool.config import Config, field_docs

README = Path(__file__).parents[2] / "README.md"


def _type_name(hint: typing.Any) -> str:
    if hint is bool:
        return "boolean"
    if hint is int:
        return "integer"
    if hint is float:
        return "number"
    if hint is str:
        return "string"
    origin = typing.get_origin(hint)
    if origin is tuple:
        (item, _) = typing.get_args(hint)
        return "list of strings" if item is str else "list of tables"
    return "table of strings"


def _default(value: typing.Any) -> str:
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, tuple):
        return "`[]`" if not value else f"`{list(value)}`"
    if isinstance(value, int | float):
        return f"`{value}`"
    return "`{}`"


def config_table() -> str:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    defaults = Config()
    for section in dataclasses.fields(Config):
        value = getattr(defaults, section.name)
        hints = typing.get_type_hints(type(value))
        docs = field_docs(type(value))
        for f in dataclasses.fields(value):
            rows.append(f"| `{section.name}.{f.name}` | {_type_name(hints[f.name])} | "
                        f"{_default(getattr(value, f.name))} | {docs[f.name]} |")
    return "\n".join(rows)


def test_readme_config_table_matches_the_code() -> None:
    assert config_table() in README.read_text(), "regenerate: python -m tests.unit.test_docs"


if __name__ == "__main__":
    print(config_table())
