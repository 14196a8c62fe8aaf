"""Penalties, logit bias, schemas and logprobs on the real default model (llama.cpp): every method equals ``ar``."""

import json

import jsonschema
import pytest
from conftest import DEFAULT_MODEL_PROMPTS

from hasten.api import generate, generate_batch, stream
from hasten.errors import HastenError

METHODS = ("pld", "lookahead", "draft", "auto")
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"},
                   "city": {"type": "string", "maxLength": 40},
                   "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 3}},
    "required": ["name", "age", "city", "hobbies"],
    "additionalProperties": False,
}
EXTRACT = ("Extract the person's name, age, city and hobbies as JSON: Maria Lopez is 34 and lives in Valencia. "
           "She likes sailing, chess and baking bread.")
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
PENALTIES = dict(presence_penalty=0.6, frequency_penalty=0.3, repetition_penalty=1.15, logit_bias={29: -3.0})


def assert_methods_equal_ar(model, prompt, max_new_tokens, methods=METHODS, **kwargs):
    plain = generate(model, prompt, "ar", max_new_tokens=max_new_tokens, **kwargs)
    for method in methods:
        fast = generate(model, prompt, method, max_new_tokens=max_new_tokens, **kwargs)
        assert fast.token_ids == plain.token_ids, method
    return plain


def test_schema_answers_equal_ar_validate_and_use_jump_forward(default_model):
    plain = assert_methods_equal_ar(default_model, EXTRACT, 96, response_format=SCHEMA_FORMAT)
    assert plain.finish_reason == "stop"
    jsonschema.validate(json.loads(plain.text), PERSON)
    assert plain.mean_accepted == 1.0  # ``ar`` is plain constrained decoding: one token a pass
    fast = generate(default_model, EXTRACT, "pld", max_new_tokens=96, response_format=SCHEMA_FORMAT)
    assert fast.mean_accepted > 1.3  # forced keys and punctuation ride as drafts


def test_penalties_and_bias_equal_ar_and_change_the_answer(default_model):
    prompt = DEFAULT_MODEL_PROMPTS[3]
    plain = assert_methods_equal_ar(default_model, prompt, 48, **PENALTIES)
    unshaped = generate(default_model, prompt, "ar", max_new_tokens=48)
    assert plain.token_ids != unshaped.token_ids
    banned = assert_methods_equal_ar(default_model, prompt, 48, methods=("pld",),
                                     **{**PENALTIES, "logit_bias": {29: -100.0, 28: -100.0}})
    assert not {29, 28} & set(banned.token_ids)  # '-' and ',' (a bias of -3 only makes them rarer)
    assert 28 in plain.token_ids  # the answer has commas otherwise


@pytest.mark.slow
@pytest.mark.parametrize("prompt", DEFAULT_MODEL_PROMPTS)
def test_every_method_equals_ar_with_penalties_and_with_a_grammar(default_model, prompt):
    assert_methods_equal_ar(default_model, prompt, 64, **PENALTIES)
    assert_methods_equal_ar(default_model, prompt, 64, response_format={"type": "json_object"}, min_p=0.1)
    assert_methods_equal_ar(default_model, prompt, 32, regex=r"(Yes|No)\. [A-Z][a-z ,]+\.")


def test_logprobs_are_the_targets_whatever_the_method(default_model):
    prompt = DEFAULT_MODEL_PROMPTS[0]
    plain = generate(default_model, prompt, "ar", max_new_tokens=40, logprobs=True, top_logprobs=3)
    assert len(plain.logprobs) == len(plain.token_ids)
    for entry, token in zip(plain.logprobs, plain.token_ids, strict=True):
        assert entry.token_id == token
        assert entry.top[0][0] == token and entry.top[0][1] == pytest.approx(entry.logprob)  # greedy: the best
    for method, options in (("pld", {"adaptive": False}), ("auto", {})):  # fixed pld drafts whatever the cost curve
        fast = generate(default_model, prompt, method, max_new_tokens=40, logprobs=True, top_logprobs=3, **options)
        assert fast.token_ids == plain.token_ids
        assert method == "auto" or fast.mean_accepted > 1
        for a, b in zip(fast.logprobs, plain.logprobs, strict=True):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_streamed_logprobs_line_up_with_the_tokens(default_model):
    events = list(stream(default_model, DEFAULT_MODEL_PROMPTS[1], "pld", max_new_tokens=24, logprobs=True))
    result = events[-1].result
    streamed = [entry for event in events for entry in event.logprobs]
    assert [entry.token_id for entry in streamed] == result.token_ids == [t for e in events for t in e.token_ids]
    assert streamed == result.logprobs


def test_batched_generations_keep_their_own_shaping(default_model):
    prompts = [EXTRACT, DEFAULT_MODEL_PROMPTS[3]]
    batched = generate_batch(default_model, prompts, "pld", max_new_tokens=40, response_format=SCHEMA_FORMAT)
    for prompt, result in zip(prompts, batched, strict=True):
        alone = generate(default_model, prompt, "ar", max_new_tokens=40, response_format=SCHEMA_FORMAT)
        assert result.token_ids == alone.token_ids


@pytest.mark.parametrize("bad", [
    dict(response_format={"type": "xml"}),
    dict(response_format={"type": "json_schema"}),
    dict(response_format={"type": "json_object"}, regex="a+"),
    dict(grammar="start: undefined_rule"),
    dict(regex="(unclosed"),
    dict(logit_bias={10**6: 1.0}),
    dict(top_logprobs=2),
    dict(logprobs=True, top_logprobs=21),
    dict(presence_penalty=2.5),
])
def test_bad_shaping_requests_are_one_line_errors(default_model, bad):
    with pytest.raises(HastenError) as error:
        generate(default_model, "Hi", "ar", max_new_tokens=4, **bad)
    assert "\n" not in str(error.value)
