"""The distilled draft exported to GGUF runs on llama.cpp and computes what the torch draft computes."""

from __future__ import annotations

import pytest
import torch
from tiny_gguf import write_tiny_gguf

from hasten.backends.llamacpp.embedding_input import ReducedDraftModel
from hasten.draft.backend import load_draft_backend
from hasten.draft.gguf_export import cached_export
from hasten.draft.model import build_draft, load_draft_on, save_draft
from hasten.errors import HastenError
from hasten.models import load_model

VOCAB = 96
DRAFT_IDS = torch.arange(4, 68)  # the draft's reduced vocabulary: 64 of the 96 ids


@pytest.fixture(scope="module", params=["f32", "q8_0"])
def tiny_draft(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"draft-{request.param}")
    path = write_tiny_gguf(folder / "target.gguf", weights=request.param, vocab_size=VOCAB, seed=5)
    hf = load_model(str(path), backend="transformers")
    save_draft(build_draft(hf.model, DRAFT_IDS, [1]), DRAFT_IDS, folder / "draft", {"num_tokens": 2})
    return load_model(str(path), backend="llamacpp", threads=1), folder, request.param


def test_exported_draft_scores_like_the_torch_draft(tiny_draft):
    target, folder, weights = tiny_draft
    exported, vocab_ids, _ = load_draft_backend(target.backend, folder / "draft")
    assert isinstance(exported, ReducedDraftModel) and torch.equal(vocab_ids, DRAFT_IDS)
    assert exported.vocab_size == len(DRAFT_IDS)
    reference, _, _ = load_draft_on(target.backend, folder / "draft")
    context = [1, 5, 9, 33, 70, 12, 8, 50, 20, 30]  # 70 lies outside the draft's vocabulary: inputs are full
    draft = exported.new_target()
    draft.start(context[:-3])
    scores = draft.score(context[-3:], [-1, 0, 1], [0, 1, 2])
    with torch.no_grad():
        expected = reference(torch.tensor([context])).logits[0, -3:]
    # the target's Q8_0 head rows stay quantized on llama.cpp (the torch draft has them dequantized)
    assert (scores.logits - expected).abs().max() < (0.02 if weights == "f32" else 0.1)
    assert torch.equal(scores.logits.argmax(-1), expected.argmax(-1))
    draft.commit([0, 1, 2])
    assert draft.cache_len == len(context)
    draft.truncate(len(context) - 2)
    again = draft.score(context[-2:], [-1, 0], [0, 1])
    assert torch.equal(again.logits, scores.logits[1:])  # chains on llama.cpp are batch-invariant here


def test_export_is_written_once(tiny_draft, tmp_path):
    target, folder, _ = tiny_draft
    first = cached_export(folder / "draft", target.path, cache=tmp_path)
    stamp = first.stat().st_mtime_ns
    assert cached_export(folder / "draft", target.path, cache=tmp_path) == first
    assert first.stat().st_mtime_ns == stamp
    assert cached_export(folder / "draft", target.path, weights="f32", cache=tmp_path) != first


def test_a_draft_for_another_target_is_refused(tiny_draft, tmp_path):
    _, folder, _ = tiny_draft
    other = load_model(str(write_tiny_gguf(tmp_path / "wide.gguf", hidden=128, vocab_size=VOCAB)),
                       backend="llamacpp", threads=1)
    with pytest.raises(HastenError, match="not trained for this target"):
        load_draft_backend(other.backend, folder / "draft")
