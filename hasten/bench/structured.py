"""Structured output in the benchmark: whether a prompt's answers are constrained, and whether an answer parses as
JSON and validates against its schema (``response_format`` itself is checked and read in ``hasten.response_format``)."""

from __future__ import annotations

import json

from jsonschema.exceptions import ValidationError
from jsonschema.validators import validator_for

from hasten.response_format import ResponseFormat, first_line

CONSTRAINED_TYPES = ("json_object", "json_schema")


def is_constrained(response_format: ResponseFormat | None) -> bool:
    """Whether answers under ``response_format`` are constrained to JSON (``text`` and None are free)."""
    return response_format is not None and response_format.get("type") in CONSTRAINED_TYPES


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
        return f"breaks the schema at '/{where}': {first_line(error.message)}"
    return None
