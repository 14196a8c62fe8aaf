"""Log-probabilities of emitted tokens, as OpenAI's ``logprobs`` reports them.

The values are the target's own: log-softmax of its raw logits at the row that produced each token (before
penalties, bias, grammar or temperature, as vLLM reports by default), whatever drafted the token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

MAX_TOP_LOGPROBS = 20  # OpenAI's limit


@dataclass(frozen=True)
class TokenLogprob:
    """One emitted token, its log-probability, and the ``top`` most likely tokens there (most likely first)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def token_logprobs(rows: torch.Tensor, tokens: Sequence[int], top: int) -> list[TokenLogprob]:
    """Each ``tokens[i]``'s log-probability under ``rows[i]`` (raw logits), with the ``top`` best alternatives."""
    logp = rows.float().log_softmax(-1)
    index = torch.tensor(list(tokens), dtype=torch.long, device=logp.device)
    chosen = logp.gather(-1, index.unsqueeze(-1)).squeeze(-1).tolist()
    if top:
        values, ids = logp.topk(top, dim=-1)
        best = [list(zip(row_ids, row_values, strict=True)) for row_ids, row_values in
                zip(ids.tolist(), values.tolist(), strict=True)]
    else:
        best = [[] for _ in tokens]
    return [TokenLogprob(token, value, alternatives)
            for token, value, alternatives in zip(tokens, chosen, best, strict=True)]
