"""Classic speculative decoding with a draft whose output covers only part of the target's vocabulary."""

from __future__ import annotations

import torch

from hasten.adaptive.chooser import DraftPolicy
from hasten.backends.base import ModelBackend
from hasten.draft.backend import shipped_draft
from hasten.proposers.draft_model import DraftModelProposer
from hasten.sampling import SamplingParams


class ReducedVocabDraftProposer(DraftModelProposer):
    """``DraftModelProposer`` for a draft that scores ``vocab_ids`` only; every other token gets -inf.

    The draft's distribution is then zero outside ``vocab_ids``. That stays lossless: the verifier accepts a
    drafted token with probability min(1, q/p) and resamples from the residual, which covers the whole
    vocabulary; under greedy decoding the target's argmax decides alone, as always.
    """

    name = "draft"

    def __init__(self, draft_model: ModelBackend, vocab_ids: torch.Tensor, vocab_size: int,
                 params: SamplingParams, num_tokens: int = 6, generator: torch.Generator | None = None,
                 policy: DraftPolicy | None = None) -> None:
        super().__init__(draft_model, params, num_tokens, generator, policy)
        if vocab_ids.ndim != 1 or len(vocab_ids) != draft_model.vocab_size:
            raise ValueError("vocab_ids needs one id per row of the draft's output head")
        self.vocab_ids = vocab_ids.to(torch.long)
        self.vocab_size = vocab_size

    def vocab_logits(self, logits: torch.Tensor) -> torch.Tensor:
        if self.vocab_ids.device != logits.device:
            self.vocab_ids = self.vocab_ids.to(logits.device)
        full = torch.full((*logits.shape[:-1], self.vocab_size), float("-inf"), dtype=logits.dtype,
                          device=logits.device)
        full[..., self.vocab_ids] = logits
        return full


def shipped_draft_proposer(target: ModelBackend, params: SamplingParams, num_tokens: int | None,
                           generator: torch.Generator | None,
                           policy: DraftPolicy | None = None) -> ReducedVocabDraftProposer:
    """``--method draft`` on the default model without ``--draft-model``: the shipped draft (loaded once)."""
    draft, vocab_ids, config = shipped_draft(target)
    return ReducedVocabDraftProposer(draft, vocab_ids, target.vocab_size, params,
                                     num_tokens=num_tokens or config.get("num_tokens", 4), generator=generator,
                                     policy=policy)
