"""Sliding windows: ``ar`` itself and the tree methods equal transformers' own greedy ``generate`` past the window,
on every architecture that slides: every layer (Mistral, Phi-3) or the layers ``layer_types`` names (Gemma 3,
Qwen2 with ``use_sliding_window``); eager and in the padded static-span layout CUDA runs."""

from __future__ import annotations

import pytest
import torch
from conftest import EOS, greedy_reference, random_prompts, tiny_tokenizer
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
)

from hasten.api import generate
from hasten.backends import TransformersModel
from hasten.backends.transformers.target import sliding_window
from hasten.engine import DecodeStats, Generation
from hasten.models import LoadedModel
from hasten.proposers.base import Proposer
from hasten.proposers.lookahead import LookaheadProposer
from hasten.proposers.prompt_lookup import PromptLookupProposer
from hasten.sampling import SamplingParams

WINDOW = 8
SLIDING = {  # architecture: (config class, what makes it slide, init std that keeps its greedy output varied)
    "mistral": (MistralConfig, {}, 0.6),
    "phi3": (Phi3Config, {}, 0.6),
    "qwen2": (Qwen2Config, {"use_sliding_window": True, "max_window_layers": 1}, 0.6),
    "gemma3_text": (Gemma3TextConfig, {"layer_types": ["sliding_attention", "full_attention"]}, 0.2),
}


def windowed_model(arch: str, window: int = WINDOW, seed: int = 0):
    """A tiny seeded model of ``arch`` whose attention slides over ``window`` positions (256: all of them)."""
    config_class, extra, std = SLIDING[arch]
    torch.manual_seed(seed)
    config = config_class(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                          bos_token_id=0, eos_token_id=EOS, pad_token_id=0, initializer_range=std,
                          tie_word_embeddings=False, attn_implementation="sdpa", sliding_window=window, **extra)
    return AutoModelForCausalLM.from_config(config).eval()


def long_prompts() -> list[list[int]]:
    return random_prompts(6, seed=3)  # 9 to 36 tokens, then 40 new ones: well past the window of 8


def run(target, proposer, prompt: list[int], new: int = 40) -> list[int]:
    generation = Generation(target, proposer, prompt, new, SamplingParams(), {EOS}, DecodeStats())
    generation.prefill()
    while not generation.finished:
        layout = generation.begin_step()
        generation.end_step(target.score(layout.tokens, layout.parents, layout.logits_rows), 1.0)
    return generation.context[len(prompt):]


def test_the_window_is_read_as_the_model_library_reads_it():
    def read(config_class, max_context=256, **kwargs):
        return sliding_window(config_class(num_hidden_layers=2, **kwargs), max_context)

    assert read(MistralConfig, sliding_window=8) == (8, True)
    assert read(MistralConfig, sliding_window=8, layer_types=["full_attention"] * 2) == (8, True)  # MistralModel
    assert read(MistralConfig, sliding_window=None) == (None, False)
    assert read(MistralConfig) == (None, False)  # its default window of 4096 closes nothing in 256 positions
    assert read(MistralConfig, 512, sliding_window=300) == (300, True)
    assert read(Phi3Config, sliding_window=2047, max_context=4096) == (2047, True)
    assert read(Phi3Config) == (None, False)
    assert read(Qwen2Config, sliding_window=8) == (None, False)  # use_sliding_window is off
    assert read(Qwen2Config, sliding_window=8, use_sliding_window=True, max_window_layers=1) == (8, False)
    assert read(Qwen2Config, sliding_window=8, use_sliding_window=True, max_window_layers=2) == (None, False)
    assert read(Gemma3TextConfig, sliding_window=8, layer_types=["sliding_attention", "full_attention"]) == (8, False)
    assert read(LlamaConfig, sliding_window=8) == (None, False)  # LlamaModel never slides


@pytest.mark.parametrize("arch", sorted(SLIDING))
def test_every_row_equals_the_models_own_forward_past_the_window(arch):
    """A prefill then one chain scored with every row's logits, against the model's forward over the whole
    sequence (which builds its own window mask): equal at every position. A window one wider or narrower gives
    other logits, so the test pins transformers' convention, off by one included."""
    model = windowed_model(arch)
    sequence = random_prompts(1, seed=5)[0] * 2  # 34 tokens
    with torch.no_grad():
        full = model(torch.tensor([sequence])).logits[0]
    target = TransformersModel(model).new_target()
    first = target.start(sequence[:5])
    rows = target.score(sequence[5:], list(range(-1, len(sequence) - 6))).logits
    assert torch.allclose(first.logits[-1], full[4], atol=1e-5)
    assert torch.allclose(rows, full[5:], atol=1e-5)
    for other in (WINDOW - 1, WINDOW + 1):
        model.config.sliding_window = other
        with torch.no_grad():
            assert not torch.allclose(model(torch.tensor([sequence])).logits[0, 5:], rows, atol=1e-3), other
    model.config.sliding_window = WINDOW


@pytest.mark.parametrize("arch", sorted(SLIDING))
def test_ar_and_trees_equal_generate_past_the_window(arch):
    """Through the API (the default backend) for ``ar``, pld and lookahead; the window changes the answers."""
    model = windowed_model(arch)
    loaded = LoadedModel(f"tiny-{arch}-window", model, tiny_tokenizer())
    unwindowed = windowed_model(arch, window=256)
    changed = 0
    for prompt in long_prompts():
        reference = greedy_reference(model, prompt, 40)
        changed += reference != greedy_reference(unwindowed, prompt, 40)
        for method in ("ar", "pld", "lookahead"):
            assert generate(loaded, prompt, method, max_new_tokens=40).token_ids == reference, method
    assert changed >= len(long_prompts()) // 2  # the prompts and outputs reach well past the window


@pytest.mark.parametrize("arch", sorted(SLIDING))
def test_padded_static_passes_equal_generate_past_the_window(arch):
    """CUDA's layout on the CPU: every pass padded to 16 rows, attention over every cache slot."""
    model = windowed_model(arch)
    backend = TransformersModel(model, pass_width=16, static_span=True)
    for prompt in long_prompts():
        reference = greedy_reference(model, prompt, 40)
        for proposer in (Proposer(), PromptLookupProposer(6, 3, 1, 3), LookaheadProposer(3, 3, 3)):
            assert run(backend.new_target(), proposer, prompt) == reference, proposer.name
