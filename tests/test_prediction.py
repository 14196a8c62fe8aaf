"""OpenAI's predicted output (``prediction``): text the answer is expected to resemble is a source of drafts for
prompt lookup, lookahead and auto, and never changes what is generated."""

from __future__ import annotations

import pytest
from conftest import EOS, greedy_reference, random_prompts, tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hasten.api import generate, make_request
from hasten.errors import HastenError
from hasten.models import LoadedModel
from hasten.proposers.prompt_lookup import PromptLookupProposer

VOCAB = 64


def words(ids: list[int]) -> str:
    """Token ids as text for the tokenizer below (fixed-width words: no special token is a prefix of another)."""
    return " ".join(f"t{i:03d}" for i in ids)


def test_lookup_drafts_from_the_expected_answer_after_the_context():
    pld = PromptLookupProposer(num_tokens=4, max_ngram=2, min_ngram=1, branches=2)
    context = [5, 6, 7, 8, 9]
    assert pld.matches(context, 4) == (0, [])  # the tail 9 occurs nowhere before
    pld.expect([1, 8, 9, 10, 11, 12, 13, 8, 9, 20])
    assert pld.matches(context, 4) == (2, [[10, 11, 12, 13], [20]])  # first occurrence first
    context = [8, 9, 30, 31, 8, 9]
    assert pld.matches(context, 3) == (2, [[30, 31, 8], [10, 11, 12]])  # the context's own match comes first


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    tokenizer = Tokenizer(models.WordLevel({f"t{i:03d}": i for i in range(VOCAB)}, unk_token="t000"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="t000", eos_token=f"t{EOS:03d}",
                                   pad_token="t000")
    return LoadedModel("tiny-llama-3", tiny_model("llama", 3, VOCAB, init_std=0.6), fast)


@pytest.fixture(scope="module")
def case(loaded):
    prompt = random_prompts(1, seed=21, repeat=False)[0]
    return prompt, greedy_reference(loaded.model, prompt, 40)


@pytest.mark.parametrize("method", ["pld", "lookahead", "auto"])
def test_a_right_prediction_saves_passes_and_a_wrong_one_changes_nothing(loaded, case, method):
    prompt, reference = case
    assert len(reference) == 40
    options = {} if method == "auto" else {"adaptive": False}
    plain = generate(loaded, prompt, method, max_new_tokens=40, **options)
    right = generate(loaded, prompt, method, max_new_tokens=40, prediction=words(reference), **options)
    wrong = generate(loaded, prompt, method, max_new_tokens=40, prediction=words(reference[::-1][:20]), **options)
    for result in (plain, right, wrong):
        assert result.token_ids == reference
    if method == "pld":  # every step then drafts the rest of the answer, which is all accepted
        assert right.target_passes <= 8 < plain.target_passes
    else:
        assert right.target_passes < plain.target_passes


def test_the_prediction_is_tokenized_without_special_tokens_and_checked(loaded):
    request = make_request(loaded, [5, 6, 7], "pld", prediction="t009 t010 t011")
    assert request.expected == [9, 10, 11]
    assert make_request(loaded, [5, 6, 7], "pld").expected == []
    with pytest.raises(HastenError, match="prediction must be a string"):
        make_request(loaded, [5, 6, 7], "pld", prediction=["t009"])
    with pytest.raises(HastenError, match="the prediction has"):
        make_request(loaded, [5, 6, 7], "pld", prediction=words([9] * (loaded.max_context + 1)))


def test_ar_ignores_the_prediction(loaded, case):
    prompt, reference = case
    result = generate(loaded, prompt, "ar", max_new_tokens=40, prediction=words(reference))
    assert result.token_ids == reference and result.target_passes == 40
