"""Structured output: the JSON schemas a client may ask droid to answer in, checked before droid sees them."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from droidpool import errors

from .model import OutputFormat

JSON_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
MAX_DEPTH = 64
MAX_NODES = 10_000
ANY_OBJECT: Mapping[str, Any] = {"type": "object"}  # json_object: any JSON object

_SUBSCHEMA = ("additionalProperties", "items", "not", "contains", "propertyNames", "if", "then", "else",
              "unevaluatedProperties", "unevaluatedItems", "additionalItems")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
_NUMBERS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")


def output_format(schema: Any, where: str, *, name: str = "", strict: bool = False) -> OutputFormat:
    """A checked ``OutputFormat``: the schema must be valid JSON Schema whose root is an object
    (droid asks the model for "a JSON object only")."""
    check_schema(schema, where)
    assert isinstance(schema, Mapping)
    kind = schema.get("type")
    if kind is not None and kind != "object" and not (isinstance(kind, list) and "object" in kind):
        raise errors.InvalidRequest(f"{where}: droid's structured answers are JSON objects, so the schema's root "
                                    f"must have type \"object\" (it has {kind!r}).", param=where,
                                    code="invalid_schema")
    return OutputFormat(schema, name, strict, where)


def check_schema(schema: Any, where: str) -> None:
    """A 400 naming ``where`` unless ``schema`` is a well-formed JSON Schema (the keywords droid and
    the upstream models act on: types, properties, required, items, enum, combinators, refs)."""
    seen = [0]

    def bad(path: str, why: str) -> errors.InvalidRequest:
        return errors.InvalidRequest(f"{where}: not a valid JSON Schema at {path or 'its root'}: {why}.",
                                     param=where, code="invalid_schema")

    def walk(node: Any, path: str, depth: int) -> None:
        seen[0] += 1
        if seen[0] > MAX_NODES or depth > MAX_DEPTH:
            raise bad(path, f"it is too large (more than {MAX_NODES} schemas or {MAX_DEPTH} levels deep)")
        if isinstance(node, bool):
            return
        if not isinstance(node, Mapping):
            raise bad(path, "a schema must be an object or a boolean")
        kind = node.get("type")
        if kind is not None:
            kinds = kind if isinstance(kind, list) else [kind]
            if not kinds or not all(isinstance(k, str) and k in JSON_TYPES for k in kinds):
                raise bad(path, f"'type' must be one of {', '.join(sorted(JSON_TYPES))} (or a list of them)")
        for key in _SUBSCHEMA:
            if key in node:
                value = node[key]
                if key == "items" and isinstance(value, list):  # the older tuple form
                    for index, item in enumerate(value):
                        walk(item, f"{path}/items/{index}", depth + 1)
                else:
                    walk(value, f"{path}/{key}", depth + 1)
        for key in _SCHEMA_LISTS:
            if key in node:
                value = node[key]
                if not isinstance(value, list) or not value:
                    raise bad(path, f"'{key}' must be a non-empty array of schemas")
                for index, item in enumerate(value):
                    walk(item, f"{path}/{key}/{index}", depth + 1)
        for key in _SCHEMA_MAPS:
            if key in node:
                value = node[key]
                if not isinstance(value, Mapping):
                    raise bad(path, f"'{key}' must be an object of schemas")
                for name, item in value.items():
                    walk(item, f"{path}/{key}/{name}", depth + 1)
        if "required" in node:
            required = node["required"]
            if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
                raise bad(path, "'required' must be an array of property names")
        if "enum" in node and (not isinstance(node["enum"], list) or not node["enum"]):
            raise bad(path, "'enum' must be a non-empty array")
        for key in _COUNTS:
            value = node.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise bad(path, f"'{key}' must be a non-negative integer")
        for key in _NUMBERS:
            value = node.get(key)
            if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)):
                raise bad(path, f"'{key}' must be a number")
        if "pattern" in node:
            pattern = node["pattern"]
            if not isinstance(pattern, str):
                raise bad(path, "'pattern' must be a string")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise bad(path, f"'pattern' is not a regular expression ({exc})") from None
        if "$ref" in node and not isinstance(node["$ref"], str):
            raise bad(path, "'$ref' must be a string")

    walk(schema, "", 0)
