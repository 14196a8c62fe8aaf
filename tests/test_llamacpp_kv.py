"""The llama.cpp target's KV cache type: Q8_0 keys and F16 values by default (one attention kernel for every pass),
F16 as fall-back."""

from __future__ import annotations

import pytest
import torch
from tiny_gguf import write_tiny_gguf

from hasten.backends.llamacpp.model import LlamaCppModel
from hasten.backends.llamacpp.shared_exactness import attention_is_batch_invariant, kv_types, lone_token_splits

CONTEXT = [(7 * i + 3) % 90 + 4 for i in range(700)]  # past 512 cells: where an F16 cache switches kernels


def root_rows(model: LlamaCppModel) -> tuple[torch.Tensor, torch.Tensor]:
    """The root's logits from a one-token pass and from a four-token chain, after the same 700-token prefill."""
    target = model.new_target()
    target.start(CONTEXT)
    alone = target.score([50], [-1], [0]).logits[0].clone()
    target.commit([])
    chain = target.score([50, 60, 70, 80], [-1, 0, 1, 2], [0, 1, 2, 3]).logits[0].clone()
    target.close()
    return alone, chain


def test_kv_type_names_keys_and_values():
    assert kv_types("q8_0/f16") == ("q8_0", "f16") and kv_types("F16") == ("f16", "f16")
    assert attention_is_batch_invariant("q8_0/f16") and attention_is_batch_invariant("q8_0")
    assert attention_is_batch_invariant("f16/q8_0") and attention_is_batch_invariant("f16/f32")
    assert not attention_is_batch_invariant("f16") and not attention_is_batch_invariant("f32/f32")


@pytest.mark.parametrize("kv_type", [None, "q8_0", "f16/q8_0"])
def test_cache_with_one_attention_kernel_gives_the_same_bits_for_every_pass_width(tmp_path, kv_type):
    path = write_tiny_gguf(tmp_path / "wide-heads.gguf", hidden=128, heads=4, kv_heads=2, ffn=256, context=1024,
                           vocab_size=96, init_std=0.5)
    model = LlamaCppModel(path, threads=2, kv_type=kv_type)
    assert model.new_target() is not None  # head size 32: whole Q8_0 blocks
    assert model.kv_type == (kv_type or "q8_0/f16")
    assert not lone_token_splits(model, 700) and model.prompt_cache is not None
    alone, chain = root_rows(model)
    assert torch.equal(alone, chain)


def test_f16_cache_control_shows_why_q8_0_is_the_default(tmp_path):
    """The control: where ggml's F16 flash attention splits a one-token pass over 512+ cells across threads
    (seen on AVX-512 machines), an F16 cache gives other bits for other pass widths. Where that kernel does not
    split (seen on AVX2), the rows agree and there is nothing to show, so the control skips; the property the
    product relies on, Q8_0's equal rows, is asserted everywhere by the test above."""
    path = write_tiny_gguf(tmp_path / "wide-heads.gguf", hidden=128, heads=4, kv_heads=2, ffn=256, context=1024,
                           vocab_size=96, init_std=0.5)
    model = LlamaCppModel(path, threads=2, kv_type="f16")
    model.new_target()
    assert model.kv_type == "f16" and lone_token_splits(model, 700)
    alone, chain = root_rows(model)
    if torch.equal(alone, chain):
        pytest.skip("this CPU's F16 attention gives the same bits at every pass width (no thread split to show)")
    # the rows differ by rounding only (0.19 against logits up to 17.5 on an AVX-512 machine), not by content
    assert (alone - chain).abs().max() < 0.05 * alone.abs().max()


def test_a_cache_that_cannot_be_quantized_falls_back_to_f16(tmp_path):
    model = LlamaCppModel(write_tiny_gguf(tmp_path / "narrow.gguf", hidden=64, heads=4), threads=1)
    model.new_target()
    assert model.kv_type == "f16"  # head size 16 is not a whole Q8_0 block


@pytest.mark.slow
def test_default_model_rows_agree_across_pass_widths_past_512_cells(default_model):
    backend = default_model.backend
    assert backend.kv_type == "q8_0/f16" and backend.threads == 2
    alone, chain = root_rows(backend)
    assert torch.equal(alone, chain)
