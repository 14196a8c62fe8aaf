"""OpenAI's ``response_format`` object: checking one (a known type; for ``json_schema``, a name and a schema its own
metaschema accepts), and reading one for ``--response-format`` (``json_object`` or a JSON file)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for

from hasten.errors import HastenError

RESPONSE_TYPES = ("text", "json_object", "json_schema")
ResponseFormat = dict[str, Any]


def first_line(text: str, limit: int = 160) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def check_schema(schema: object) -> None:
    """Raise ``HastenError`` unless ``schema`` is a JSON Schema object its own metaschema accepts."""
    if not isinstance(schema, dict):
        raise HastenError(f"a JSON schema must be an object, got {type(schema).__name__}")
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as error:
        raise HastenError(f"not a valid JSON schema: {first_line(error.message)}") from None


def check_response_format(value: object) -> ResponseFormat:
    """``value`` if it is an OpenAI ``response_format`` object: ``{"type": "text"}``, ``{"type": "json_object"}``
    or ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}``; else a
    one-line ``HastenError``."""
    if not isinstance(value, dict):
        raise HastenError(f"'response_format' must be an object, got {type(value).__name__}")
    kind = value.get("type")
    if kind not in RESPONSE_TYPES:
        raise HastenError(f"'response_format' has type {kind!r}; expected one of {', '.join(RESPONSE_TYPES)}")
    if kind != "json_schema":
        return value
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise HastenError("'response_format' of type json_schema needs a 'json_schema' object")
    if not isinstance(spec.get("name"), str) or not spec["name"].strip():
        raise HastenError("'response_format.json_schema' needs a non-empty string 'name'")
    if "strict" in spec and not isinstance(spec["strict"], bool):
        raise HastenError("'response_format.json_schema.strict' must be true or false")
    if "schema" not in spec:
        raise HastenError("'response_format.json_schema' needs a 'schema'")
    try:
        check_schema(spec["schema"])
    except HastenError as error:
        raise HastenError(f"'response_format.json_schema.schema': {error}") from None
    return value


def read_response_format(value: str) -> ResponseFormat:
    """``--response-format``: ``json_object``, or a JSON file holding a ``response_format`` object or a bare JSON
    schema (which becomes a strict ``json_schema`` named after the file)."""
    if value == "json_object":
        return {"type": "json_object"}
    path = Path(value)
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise HastenError(f"--response-format: expected json_object or a JSON file, cannot read {value}: "
                          f"{getattr(error, 'strerror', None) or error}") from None
    except json.JSONDecodeError as error:
        raise HastenError(f"--response-format: {value} is not valid JSON ({error.msg}, line {error.lineno})") from None
    try:
        if isinstance(loaded, dict) and loaded.get("type") in RESPONSE_TYPES:  # never a JSON Schema type
            return check_response_format(loaded)
        check_schema(loaded)
    except HastenError as error:
        raise HastenError(f"--response-format: {value}: {error}") from None
    name = re.sub(r"[^A-Za-z0-9_-]", "_", path.stem)[:64] or "schema"
    return {"type": "json_schema", "json_schema": {"name": name, "schema": loaded, "strict": True}}
