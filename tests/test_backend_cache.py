"""KV-cache edges of the backends: trees past a sliding window, and the cache length after every step."""

from __future__ import annotations

import pytest
import torch
from conftest import EOS, greedy_reference, random_prompts, tiny_model
from tiny_gguf import write_tiny_gguf
from transformers import AutoModelForCausalLM, Gemma3TextConfig, MistralConfig, Phi3Config

from hasten.backends import TransformersModel
from hasten.engine import DecodeStats, Generation
from hasten.proposers.base import Proposer
from hasten.proposers.lookahead import LookaheadProposer
from hasten.proposers.prompt_lookup import PromptLookupProposer
from hasten.sampling import SamplingParams

GREEDY = SamplingParams()


def _sliding(arch: str, seed: int = 0):
    """A tiny model with a window of 8: on every layer (mistral, phi3) or the layers ``layer_types`` names."""
    config_class, extra, std = {
        "gemma3_text": (Gemma3TextConfig, {"layer_types": ["sliding_attention", "full_attention"]}, 0.2),
        "mistral": (MistralConfig, {"tie_word_embeddings": False}, 0.6),
        "phi3": (Phi3Config, {"tie_word_embeddings": False}, 0.6),
    }[arch]
    torch.manual_seed(seed)
    config = config_class(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                          sliding_window=8, bos_token_id=0, eos_token_id=EOS, pad_token_id=0, initializer_range=std,
                          attn_implementation="sdpa", **extra)
    return AutoModelForCausalLM.from_config(config).eval()


def _run(target, proposer, prompt, new=40):
    generation = Generation(target, proposer, prompt, new, GREEDY, {EOS}, DecodeStats())
    generation.prefill()
    lengths = []
    while not generation.finished:
        layout = generation.begin_step()
        generation.end_step(target.score(layout.tokens, layout.parents, layout.logits_rows), 1.0)
        lengths.append((target.cache_len, target.cached_length() if hasattr(target, "cached_length")
                        else target.real_cache_len(), len(generation.context) - 1))
    return generation.context[len(prompt):], lengths


@pytest.mark.parametrize("arch", ["gemma3_text", "mistral", "phi3"])
def test_trees_stay_exact_past_a_sliding_window(arch):
    """Before the fixes, pld (3 branches) gave 2 of 8 and lookahead 8 of 8 outputs unlike ``generate`` on gemma3;
    on mistral and phi3 (a window without ``layer_types``) every method, ``ar`` included, gave 8 of 8."""
    model = _sliding(arch)
    backend = TransformersModel(model)
    assert backend.sliding_window == 8
    for prompt in random_prompts(8, seed=3):  # 9-36 tokens: past the window of 8
        reference = greedy_reference(model, prompt, 40)
        for proposer in (PromptLookupProposer(6, 3, 1, 3), LookaheadProposer(3, 3, 3)):
            assert _run(backend.new_target(), proposer, prompt)[0] == reference


def test_cache_length_is_the_context_after_every_step_on_both_backends(tmp_path):
    from hasten.backends.llamacpp.model import LlamaCppModel

    backends = [TransformersModel(tiny_model("llama", 3, init_std=0.6)),
                LlamaCppModel(write_tiny_gguf(tmp_path / "t.gguf", seed=1, vocab_size=64, init_std=0.6), threads=1)]
    for backend in backends:
        for prompt in random_prompts(4, seed=9):
            for proposer in (Proposer(), PromptLookupProposer(6, 3, 1, 3), LookaheadProposer(2, 4, 2)):
                _, lengths = _run(backend.new_target(), proposer, prompt + prompt)
                assert lengths and all(a == b == c for a, b, c in lengths), (backend.backend, proposer.name)

