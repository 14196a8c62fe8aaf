"""Structured output in the benchmark: checking a prompt's ``response_format`` (the OpenAI object), reading one for
``--response-format``, and checking that an answer parses as JSON and validates against its schema."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from jsonschema.exceptions import SchemaError, ValidationError
from jsonschema.validators import validator_for

from hasten.errors import HastenError

RESPONSE_TYPES = ("text", "json_object", "json_schema")
CONSTRAINED_TYPES = ("json_object", "json_schema")
ResponseFormat = dict[str, Any]


def _first_line(text: str, limit: int = 160) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def check_schema(schema: object) -> None:
    """Raise ``HastenError`` unless ``schema`` is a JSON Schema object its own metaschema accepts."""
    if not isinstance(schema, dict):
        raise HastenError(f"a JSON schema must be an object, got {type(schema).__name__}")
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as error:
        raise HastenError(f"not a valid JSON schema: {_first_line(error.message)}") from None


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


def is_constrained(response_format: ResponseFormat | None) -> bool:
    """Whether answers under ``response_format`` are constrained to JSON (``text`` and None are free)."""
    return response_format is not None and response_format.get("type") in CONSTRAINED_TYPES


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


def answer_error(text: str, response_format: ResponseFormat) -> str | None:
    """Why ``text`` does not satisfy ``response_format`` (it is not JSON, not an object for ``json_object``, or
    breaks the schema), in one line; None when it does, or when the format is free text."""
    if not is_constrained(response_format):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        return f"not JSON: {error.msg} at character {error.pos}"
    if response_format["type"] == "json_object":
        return None if isinstance(value, dict) else f"not a JSON object but {type(value).__name__}"
    schema = response_format["json_schema"]["schema"]
    try:
        validator_for(schema)(schema).validate(value)
    except ValidationError as error:
        where = "/".join(str(part) for part in error.absolute_path)
        return f"breaks the schema at '/{where}': {_first_line(error.message)}"
    return None
