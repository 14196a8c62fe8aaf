"""hasten bench's structured-output category: response_format in prompt files, --response-format and --category,
and the check that constrained answers parse and validate."""

from __future__ import annotations

import json

import pytest
from jsonschema.validators import validator_for

from hasten.bench import BenchPrompt, read_prompts, select_categories, with_response_format
from hasten.bench.structured import answer_error, check_response_format, is_constrained, read_response_format
from hasten.errors import HastenError

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
          "required": ["name", "age"], "additionalProperties": False}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}


def write_lines(tmp_path, *records: object):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------- prompt files


def test_reads_a_response_format_per_prompt(tmp_path):
    path = write_lines(tmp_path, {"question_id": 1, "turns": ["Extract."], "response_format": JSON_SCHEMA},
                       {"prompt": "Any JSON.", "response_format": {"type": "json_object"}}, {"prompt": "Free text."})
    first, second, third = read_prompts(path)
    assert first.response_format == JSON_SCHEMA and is_constrained(first.response_format)
    assert second.response_format == {"type": "json_object"} and is_constrained(second.response_format)
    assert third.response_format is None and not is_constrained(third.response_format)


@pytest.mark.parametrize(
    ("response_format", "message"),
    [
        ("json_object", "must be an object"),
        ({"type": "xml"}, "has type 'xml'"),
        ({}, "has type None"),
        ({"type": "json_schema"}, "needs a 'json_schema' object"),
        ({"type": "json_schema", "json_schema": {"schema": SCHEMA}}, "non-empty string 'name'"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "needs a 'schema'"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": "yes"}}, "true or false"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}, "must be an object"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strng"}}}, "not a valid JSON schema"),
    ],
)
def test_a_bad_response_format_names_file_and_line(tmp_path, response_format, message):
    path = write_lines(tmp_path, {"prompt": "ok"}, {"prompt": "Extract.", "response_format": response_format})
    with pytest.raises(HastenError) as error:
        read_prompts(path)
    text = str(error.value)
    assert text.startswith(f"{path}, line 2: ")
    assert message in text
    assert "\n" not in text


def test_the_shipped_structured_category():
    structured = [p for p in read_prompts() if p.category == "structured"]
    assert 8 <= len(structured) <= 12
    assert len({p.response_format["json_schema"]["name"] for p in structured}) == len(structured)
    kinds: set[str] = set()

    def walk(schema: dict) -> None:
        kinds.add(schema.get("type", "enum" if "enum" in schema else "?"))
        if "enum" in schema:
            kinds.add("enum")
        if schema.get("type") == "object":
            assert schema["additionalProperties"] is False
            assert set(schema["required"]) == set(schema["properties"])
            for child in schema["properties"].values():
                walk(child)
        if schema.get("type") == "array":
            walk(schema["items"])

    for prompt in structured:
        assert len(prompt.turns) == 1 and "JSON" in prompt.turns[0]
        assert prompt.response_format["type"] == "json_schema" and prompt.response_format["json_schema"]["strict"]
        schema = prompt.response_format["json_schema"]["schema"]
        validator_for(schema).check_schema(schema)
        assert all(key in prompt.turns[0] for key in schema["properties"])  # the prompt names every field
        walk(schema)
    assert {"object", "array", "string", "integer", "number", "boolean", "enum"} <= kinds


# ---------------------------------------------------------------- --category and --response-format


PROMPTS = [BenchPrompt(1, "chat", ("a",)), BenchPrompt(2, "structured", ("b",), JSON_SCHEMA),
           BenchPrompt(3, "code", ("c",)), BenchPrompt(4, "structured", ("d",))]


def test_select_categories_keeps_file_order():
    assert [p.question_id for p in select_categories(PROMPTS, ["structured", "chat"])] == [1, 2, 4]
    assert select_categories(PROMPTS, None) == PROMPTS
    with pytest.raises(HastenError, match=r"no prompts in 'poetry' \(categories: chat, structured, code\)"):
        select_categories(PROMPTS, ["chat", "poetry"])


def test_the_flag_applies_to_prompts_without_their_own():
    applied = with_response_format(PROMPTS, {"type": "json_object"})
    assert [p.response_format for p in applied] == [{"type": "json_object"}, JSON_SCHEMA, {"type": "json_object"},
                                                    {"type": "json_object"}]
    assert [(p.question_id, p.category, p.turns) for p in applied] == [(p.question_id, p.category, p.turns)
                                                                        for p in PROMPTS]
    assert with_response_format(PROMPTS, None) == PROMPTS


def test_read_response_format(tmp_path):
    assert read_response_format("json_object") == {"type": "json_object"}
    bare = tmp_path / "my person.json"
    bare.write_text(json.dumps(SCHEMA), encoding="utf-8")
    assert read_response_format(str(bare)) == {"type": "json_schema",
                                               "json_schema": {"name": "my_person", "schema": SCHEMA, "strict": True}}
    whole = tmp_path / "format.json"
    whole.write_text(json.dumps(JSON_SCHEMA), encoding="utf-8")
    assert read_response_format(str(whole)) == JSON_SCHEMA


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "expected json_object or a JSON file, cannot read"),
        ("{oops", "is not valid JSON"),
        (json.dumps({"type": "json_schema"}), "needs a 'json_schema' object"),
        (json.dumps({"type": "objekt"}), "not a valid JSON schema"),
        (json.dumps([1, 2]), "must be an object"),
    ],
)
def test_read_response_format_errors(tmp_path, content, message):
    path = tmp_path / "format.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(HastenError) as error:
        read_response_format(str(path))
    assert str(error.value).startswith("--response-format: ")
    assert message in str(error.value) and "\n" not in str(error.value)


# ---------------------------------------------------------------- checking answers


def test_answer_error():
    assert answer_error('{"name": "Ada", "age": 36}', JSON_SCHEMA) is None
    assert answer_error(' {"name": "Ada", "age": 36}\n', JSON_SCHEMA) is None
    assert answer_error('{"name": "Ada", "age": 36', JSON_SCHEMA).startswith("not JSON: ")
    assert answer_error('{"name": "Ada", "age": -1}', JSON_SCHEMA).startswith("breaks the schema at '/age': ")
    assert "'extra'" in answer_error('{"name": "Ada", "age": 1, "extra": 2}', JSON_SCHEMA)
    assert "'age' is a required property" in answer_error('{"name": "Ada"}', JSON_SCHEMA)
    assert answer_error("[1]", {"type": "json_object"}) == "not a JSON object but list"
    assert answer_error("{}", {"type": "json_object"}) is None
    assert answer_error("anything", {"type": "text"}) is None
    assert check_response_format({"type": "text"}) == {"type": "text"}
