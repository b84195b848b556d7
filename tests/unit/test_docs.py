"""The docs stay true to the code: the README's configuration table is the config's."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

from droidpool import errors
from droidpool.api import anthropic, openai_wire
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
        return {str: "list of strings", float: "list of numbers"}.get(item, "list of tables")
    args = typing.get_args(hint)
    return "table of numbers" if len(args) == 2 and args[1] is float else "table of strings"


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


def error_table() -> str:
    """Each neutral kind of error in both envelopes, from the dialects' own mapping tables."""
    rows = ["| kind | example `code` | OpenAI status, `type` | Anthropic status, `type` |", "|---|---|---|---|"]
    seen: set[str] = set()
    for cls in _error_classes():
        if cls.kind in seen:
            continue
        seen.add(cls.kind)
        error = cls("x")
        status, body = anthropic.error_body(error)
        rows.append(f"| {cls.kind} | `{error.error_code or 'null'}` | {error.status} `{openai_wire.TYPES[cls.kind]}` | "
                    f"{status} `{body['error']['type']}` |")
    return "\n".join(rows)


def _error_classes() -> list[type[errors.DroidpoolError]]:
    out: list[type[errors.DroidpoolError]] = []
    pending = [errors.DroidpoolError]
    while pending:
        cls = pending.pop(0)
        out.append(cls)
        pending.extend(cls.__subclasses__())
    return sorted(out[1:], key=lambda c: (c.status, c.__name__))


def thinking_table() -> str:
    rows = ["| `thinking` | droid effort |", "|---|---|", "| `{type: disabled}` or absent | none asked for |",
            "| `{type: adaptive}` | `dynamic` |"]
    low = 1024
    for bound, effort in anthropic.THINKING_EFFORTS:
        rows.append(f"| `{{type: enabled}}`, `budget_tokens` {low} to {bound} | `{effort}` |")
        low = bound + 1
    rows.append(f"| `{{type: enabled}}`, `budget_tokens` above {low - 1} | `{anthropic.THINKING_ABOVE}` |")
    return "\n".join(rows)


TABLES = {"config": config_table, "errors": error_table, "thinking": thinking_table}


def test_readme_config_table_matches_the_code() -> None:
    assert config_table() in README.read_text(), "regenerate: python -m tests.unit.test_docs"


def test_readme_error_and_thinking_tables_match_the_dialects() -> None:
    text = README.read_text()
    assert error_table() in text, "regenerate: python -m tests.unit.test_docs errors"
    assert thinking_table() in text, "regenerate: python -m tests.unit.test_docs thinking"


if __name__ == "__main__":
    import sys

    print(TABLES[sys.argv[1] if len(sys.argv) > 1 else "config"]())
