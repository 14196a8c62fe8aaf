"""hasten bench's structured-output category: response_format in prompt files, --response-format and --category,
and the check that constrained answers parse and validate."""

from __future__ import annotations

import json

import pytest
from conftest import EOS, tiny_model
from jsonschema.validators import validator_for
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import hasten.bench.runner as runner
from hasten.bench import BenchPrompt, read_prompts, run_bench, select_categories, with_response_format, write_report
from hasten.bench.report import table
from hasten.bench.runner import run_question
from hasten.bench.structured import answer_error, is_constrained
from hasten.cli import main
from hasten.errors import HastenError
from hasten.models import LoadedModel
from hasten.response_format import check_response_format, read_response_format
from hasten.sampling import SamplingParams

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


# ---------------------------------------------------------------- the runner, on a tiny model

JSON_WORDS = {40: '{"name":', 41: '"Ada",', 42: '"age":', 43: "36}", 44: "-1}"}
VALID, BREAKS_SCHEMA = [40, 41, 42, 43, EOS], [40, 41, 42, 44, EOS]


def json_loaded() -> LoadedModel:
    """A tiny model whose word-level tokenizer has a few JSON words (tokens 40-44): decoding VALID gives
    '{"name": "Ada", "age": 36}'."""
    vocab = {f"w{i}": i for i in range(64) if i not in JSON_WORDS} | {word: i for i, word in JSON_WORDS.items()}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="w0", eos_token=f"w{EOS}", pad_token="w0")
    return LoadedModel("tiny-json", tiny_model(), fast)


QUESTIONS = [BenchPrompt(1, "copy", ("w5 w6 w7 w8 w5 w6 w7 w8",)),
             BenchPrompt(2, "structured", ("w20 w21 w22 w20 w21",), JSON_SCHEMA),
             BenchPrompt(3, "structured", ("w30 w31 w30 w31",), {"type": "json_object"})]


@pytest.fixture()
def seen(monkeypatch):
    """Every generation's (method, first prompt token, response_format). The tiny model cannot follow one, so the
    fake answers a constrained question with VALID, except pld on question 2, which breaks the schema."""
    calls: list[tuple[str, int, object]] = []
    real = runner.generate

    def fake(loaded, ids, method, *, response_format=None, **kwargs):
        calls.append((method, ids[0], response_format))
        result = real(loaded, ids, method, **kwargs)
        if response_format is not None:
            result.token_ids = list(BREAKS_SCHEMA if (method, ids[0]) == ("pld", 20) else VALID)
        return result

    monkeypatch.setattr(runner, "generate", fake)
    return calls


def test_response_formats_reach_every_method_and_answers_are_checked(seen, tmp_path):
    res = run_bench(json_loaded(), QUESTIONS, ["ar", "pld", "hf_generate"], max_new_tokens=6, warmup=0,
                    progress=False)
    formats = {1: None, 2: JSON_SCHEMA, 3: {"type": "json_object"}}
    assert sorted(seen, key=str) == sorted([(m, q * 10 if q > 1 else 5, formats[q]) for m in ("ar", "pld")
                                            for q in formats], key=str)
    assert res["constrained"] == [2, 3]
    ar, pld, hf = (res["methods"][m] for m in ("ar", "pld", "hf_generate"))
    assert ar["structured"] == {"answers": 2, "valid": 2, "invalid": []}
    assert pld["structured"]["answers"] == 2 and pld["structured"]["valid"] == 1
    [bad] = pld["structured"]["invalid"]
    assert bad["question_id"] == 2 and bad["error"].startswith("breaks the schema at '/age': -1 is less than")
    assert pld["exact"] is False and pld["mismatches"] == [2]  # exactness covers constrained questions too
    assert ar["exact"] is True
    # transformers' generate follows no response_format: it leaves those questions out, and says so
    assert hf["structured"] is None and hf["exact"] is True and hf["categories"]["structured"]["speedup"] is None
    assert [r["question_id"] for r in res["records"] if r["method"] == "hf_generate"] == [1]
    assert any(w.startswith("hf_generate left out the 2 question(s) with a response_format (2, 3)")
               for w in res["warnings"])
    records = {(r["method"], r["question_id"]): r for r in res["records"]}
    assert records["ar", 1]["json_valid"] is None and records["ar", 2]["json_valid"] is True
    assert records["pld", 2]["json_valid"] is False and records["pld", 2]["json_error"] == bad["error"]
    leaderboard = table(res).splitlines()
    assert leaderboard[0].endswith("| exact | valid JSON |")
    assert [line.rsplit(" | ", 1)[-1] for line in leaderboard[2:]] == ["2/2 |", "1/2 |", "n/a |"]
    report = (write_report(res, tmp_path / "out") / "report.md").read_text()
    assert f"- pld: question 2: {bad['error']}" in report.split("## Structured answers")[1]


def test_anchors_are_skipped_when_every_question_is_constrained(seen):
    res = run_bench(json_loaded(), QUESTIONS[1:], ["ar", "hf_generate"], max_new_tokens=4, warmup=1,
                    progress=False)
    assert list(res["methods"]) == ["ar"]
    assert "does not follow a response_format" in res["skipped"]["hf_generate"]
    assert res["methods"]["ar"]["structured"]["valid"] == 2
    with pytest.raises(HastenError, match="hf_generate cannot follow a response_format"):
        run_question("hf_generate", json_loaded(), QUESTIONS[1], 4, SamplingParams(), {}, None)


def test_no_constraint_no_column(seen):
    res = run_bench(json_loaded(), QUESTIONS[:1], ["ar"], max_new_tokens=4, warmup=0, progress=False)
    assert res["constrained"] == [] and res["methods"]["ar"]["structured"] is None
    assert all(fmt is None for _, _, fmt in seen)
    assert "valid JSON" not in table(res)


def test_the_grammars_tokenizer_is_built_before_any_run_is_timed(monkeypatch):
    """Building llguidance's view of a tokenizer takes 4 s on Gemma 3's vocabulary: it once fell inside whichever
    run met the first constrained question. The bench builds it first, and only where a question is constrained."""
    built: list[int] = []
    at_first_generation: list[list[int]] = []
    real_tokenizer, real_generate = runner.grammar_tokenizer, runner.generate

    def counting(tokenizer, vocab_size):
        built.append(vocab_size)  # the tiny word-level tokenizer has no grammar view: the runs say so themselves
        return real_tokenizer(tokenizer, vocab_size)

    def first_seen(*args, **kwargs):
        at_first_generation.append(list(built))
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(runner, "grammar_tokenizer", counting)
    monkeypatch.setattr(runner, "generate", first_seen)
    loaded = json_loaded()
    res = run_bench(loaded, QUESTIONS, ["ar"], max_new_tokens=2, warmup=1, progress=False)
    assert at_first_generation[0] == [loaded.vocab_size]
    errors = {r["question_id"]: r["error"] for r in res["records"]}
    assert errors[1] is None and "structured output is not available" in errors[2]
    built.clear()
    run_bench(loaded, QUESTIONS[:1], ["ar"], max_new_tokens=2, warmup=0, progress=False)
    assert built == []


# ---------------------------------------------------------------- CLI


def test_cli_checks_category_and_response_format_before_loading_a_model(tmp_path, capsys):
    common = ["bench", "--out", str(tmp_path / "out"), "--model", "/nonexistent"]
    assert main([*common, "--category", "poetry"]) == 2
    assert "--category: no prompts in 'poetry' (categories: chat, " in capsys.readouterr().err
    assert main([*common, "--category", " , "]) == 2
    assert "--category is empty" in capsys.readouterr().err
    assert main([*common, "--response-format", str(tmp_path / "absent.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hasten: error: --response-format: expected json_object or a JSON file") and "\n" not in \
        err.rstrip("\n")
    assert not (tmp_path / "out").exists()


def test_cli_passes_the_chosen_prompts_and_their_formats_to_the_runner(tmp_path, monkeypatch):
    import hasten.commands.bench as command
    import hasten.models

    captured = {}

    def fake_run_bench(models, prompts, methods, **kwargs):
        captured["prompts"] = prompts
        raise HastenError("stop here")

    monkeypatch.setattr(hasten.models, "load_model", lambda *args, **kwargs: json_loaded())
    monkeypatch.setattr(command, "run_bench", fake_run_bench)
    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(SCHEMA), encoding="utf-8")
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "w5 w6", "category": "chat"},
        {"prompt": "w7 w8", "category": "structured", "response_format": {"type": "json_object"}},
        {"prompt": "w9 w10", "category": "structured"},
        {"prompt": "w11 w12", "category": "code"}]), encoding="utf-8")
    assert main(["bench", "--prompts", str(path), "--category", "structured,chat", "--response-format", str(schema),
                 "--out", str(tmp_path / "out")]) == 2
    assert [(p.question_id, p.response_format["type"]) for p in captured["prompts"]] == [
        (1, "json_schema"), (2, "json_object"), (3, "json_schema")]
    assert captured["prompts"][0].response_format["json_schema"] == {"name": "person", "schema": SCHEMA,
                                                                      "strict": True}


# ---------------------------------------------------------------- the real model, constrained by llguidance


@pytest.mark.slow
def test_default_model_structured_answers_validate_and_match_ar(default_model):
    prompts = [p for p in read_prompts() if p.category == "structured"][:2]
    res = run_bench(default_model, prompts, ["ar", "pld", "auto", "llamacpp_generate"], max_new_tokens=128,
                    warmup=0, progress=False)
    assert list(res["methods"]) == ["ar", "pld", "auto"]
    assert "every question has one" in res["skipped"]["llamacpp_generate"]
    for method, entry in res["methods"].items():
        assert entry["errors"] == [], method
        assert entry["structured"] == {"answers": 2, "valid": 2, "invalid": []}, method
        assert entry["exact"] is True, (method, entry["mismatches"])
    assert res["methods"]["auto"]["mean_accepted"] > 1.0  # forced keys and punctuation get drafted
