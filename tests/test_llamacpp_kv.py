"""The llama.cpp target's KV cache type: Q8_0 by default (one attention kernel for every pass), F16 as fall-back."""

from __future__ import annotations

import pytest
import torch
from tiny_gguf import write_tiny_gguf

from hasten.backends.llamacpp_target import LlamaCppModel

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


def test_quantized_cache_gives_the_same_bits_for_every_pass_width(tmp_path):
    path = write_tiny_gguf(tmp_path / "wide-heads.gguf", hidden=128, heads=4, kv_heads=2, ffn=256, context=1024,
                           vocab_size=96, init_std=0.5)
    model = LlamaCppModel(path, threads=2)
    assert model.new_target() is not None and model.kv_type == "q8_0"  # head size 32: whole Q8_0 blocks
    alone, chain = root_rows(model)
    assert torch.equal(alone, chain)
    # why it is the default: with llama.cpp's F16 cache, 2 threads split a one-token pass's 700 cells (0.3.36)
    assert not torch.equal(*root_rows(LlamaCppModel(path, threads=2, kv_type="f16")))


def test_a_cache_that_cannot_be_quantized_falls_back_to_f16(tmp_path):
    model = LlamaCppModel(write_tiny_gguf(tmp_path / "narrow.gguf", hidden=64, heads=4), threads=1)
    model.new_target()
    assert model.kv_type == "f16"  # head size 16 is not a whole Q8_0 block


@pytest.mark.slow
def test_default_model_rows_agree_across_pass_widths_past_512_cells(default_model):
    backend = default_model.backend
    assert backend.kv_type == "q8_0" and backend.threads == 2
    alone, chain = root_rows(backend)
    assert torch.equal(alone, chain)
