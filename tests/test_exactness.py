"""Greedy exactness: every method reproduces transformers' greedy ``generate`` token for token."""

import pytest
from conftest import (
    DEFAULT_MODEL_PROMPTS,
    EOS,
    default_reference,
    greedy_reference,
    random_prompts,
    tiny_loaded,
    tiny_model,
)

from hasten.adaptive import adaptive_state
from hasten.adaptive.cost import CostModel
from hasten.api import generate
from hasten.backends import TransformersModel, TransformersTarget
from hasten.engine import DecodeStats, decode
from hasten.proposers.draft_model import DraftModelProposer
from hasten.proposers.prompt_lookup import PromptLookupProposer
from hasten.sampling import SamplingParams

GREEDY = SamplingParams()


def run(model, proposer, prompt, max_new_tokens=40, stats=None):
    chunks = decode(TransformersTarget(model), proposer, prompt, max_new_tokens, GREEDY, {EOS}, stats)
    return [token for chunk in chunks for token in chunk]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pld_matches_greedy_generate(arch, seed):
    model = tiny_model(arch, seed)
    stats = DecodeStats()
    for prompt in random_prompts(8, seed=seed):
        proposer = PromptLookupProposer(num_tokens=6, branches=3)
        assert run(model, proposer, prompt, stats=stats) == greedy_reference(model, prompt, 40)
    assert stats.drafted_tokens > 0


def test_pld_trees_are_exercised_and_accepted():
    """Copy-heavy prompts on a model that repeats itself: multi-branch trees get verified and accepted."""
    model = tiny_model("llama", 3, init_std=0.6)
    stats = DecodeStats()
    for prompt in random_prompts(12, seed=5):
        prompt = prompt + prompt
        assert run(model, PromptLookupProposer(num_tokens=8, branches=4), prompt, 60, stats) == greedy_reference(
            model, prompt, 60
        )
    assert stats.accepted_drafts > 0
    assert stats.mean_accepted > 1.0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_draft_model_matches_greedy_generate(arch):
    target = tiny_model(arch, 10)
    drafts = {"other": tiny_model(arch, 11, layers=1), "self": target}
    for name, draft in drafts.items():
        stats = DecodeStats()
        for prompt in random_prompts(8, seed=7, repeat=False):
            proposer = DraftModelProposer(TransformersModel(draft), GREEDY, num_tokens=4)
            assert run(target, proposer, prompt, stats=stats) == greedy_reference(target, prompt, 40), name
        if name == "self":  # the target as its own draft: every guess accepted, K+1 tokens per pass
            assert stats.accepted_drafts == stats.drafted_tokens
            assert stats.mean_accepted > 4


@pytest.mark.parametrize("arch", ["mistral", "qwen3", "gemma3_text", "phi3", "olmo2"])
def test_other_supported_architectures_match(arch):
    model = tiny_model(arch, 1)
    stats = DecodeStats()
    for prompt in random_prompts(5, seed=3):
        proposer = PromptLookupProposer(num_tokens=6, branches=3)
        assert run(model, proposer, prompt, 30, stats) == greedy_reference(model, prompt, 30)
    assert stats.drafted_tokens > 0


def test_unsupported_architecture_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    from hasten.errors import HastenError

    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2)).eval()
    with pytest.raises(HastenError, match="not supported"):
        TransformersTarget(model)


def test_eager_attention_matches_too():
    model = tiny_model("llama", 4, attn="eager")
    for prompt in random_prompts(6, seed=4):
        assert run(model, PromptLookupProposer(num_tokens=5, branches=3), prompt) == greedy_reference(model, prompt, 40)


def test_api_stream_equals_generate_and_stops_at_max_tokens():
    from hasten.api import stream

    loaded = tiny_loaded("llama", 6)
    prompt = random_prompts(1, seed=6)[0]
    result = generate(loaded, prompt, "pld", max_new_tokens=17)
    events = list(stream(loaded, prompt, "pld", max_new_tokens=17))
    assert "".join(event.text for event in events) == result.text
    assert [t for event in events for t in event.token_ids] == result.token_ids
    assert events[-1].result.token_ids == result.token_ids
    assert len(result.token_ids) <= 17
    reference = greedy_reference(loaded.model, prompt, 17)
    assert result.token_ids == reference


def test_stop_string_cuts_the_text():
    loaded = tiny_loaded("llama", 6)
    answers = ((p, generate(loaded, p, "ar", max_new_tokens=12)) for p in random_prompts(20, seed=8))
    prompt, full = next((p, r) for p, r in answers if len(r.text.split()) >= 6)
    words = full.text.split()
    stop = words[3]
    cut = generate(loaded, prompt, "pld", max_new_tokens=12, stop=[stop])
    assert cut.finish_reason == "stop"
    assert stop not in cut.text and full.text.startswith(cut.text)
    # Token ids stop where the text does: the tokens after the cut are not reported.
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)] and len(cut.token_ids) < len(full.token_ids)
    assert loaded.tokenizer.decode(cut.token_ids, skip_special_tokens=True).startswith(cut.text)
    assert len(loaded.tokenizer.decode(cut.token_ids[:-1], skip_special_tokens=True)) < len(cut.text)  # none extra


@pytest.mark.slow
@pytest.mark.parametrize("prompt", DEFAULT_MODEL_PROMPTS)
def test_default_model_pld_and_ar_match_generate(default_model_hf, prompt):
    reference = default_reference(default_model_hf, prompt, 48)
    for method in ("ar", "pld"):
        result = generate(default_model_hf, prompt, method, max_new_tokens=48)
        assert result.token_ids == reference, method


def steps_at(rate: float, steps: int) -> int:
    """How many of ``steps`` a per-step rate stands for (a whole number of them)."""
    count = round(rate * steps)
    assert rate * steps == pytest.approx(count), (rate, steps)
    return count


def test_method_statistics_are_reported():
    """The rates agree with the generation's own counts: one proposer step per target pass after the prefill."""
    loaded = tiny_loaded("llama", 6)
    # a flat curve, as on a GPU, in place of one calibrated on the tiny model (sub-millisecond passes whose shape
    # varies from run to run on a busy machine, and can close lookahead's window): drafting always pays here
    adaptive_state(loaded).cost = CostModel([1, 64], [1000.0, 1000.0])
    prompt = random_prompts(1, seed=6)[0] * 2
    lookahead = generate(loaded, prompt, "lookahead", max_new_tokens=20)
    stats, steps = lookahead.method_stats, lookahead.target_passes - 1
    assert set(stats) >= {"pool_hit_rate", "guess_rate"}
    hits, guesses = steps_at(stats["pool_hit_rate"], steps), steps_at(stats["guess_rate"], steps)
    assert 0 < hits <= min(guesses, lookahead.accepted_drafts)  # a hit step accepts at least one guessed token
    pld = generate(loaded, prompt, "pld", max_new_tokens=5)
    assert set(pld.method_stats) == {"mean_drafted", "plain_steps"}
    assert pld.drafted_tokens > 0 and pld.method_stats["mean_drafted"] > 0 and pld.method_stats["plain_steps"] < 1
    assert generate(loaded, prompt, "pld", max_new_tokens=5, adaptive=False).method_stats == {}
