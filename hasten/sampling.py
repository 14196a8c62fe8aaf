"""Sampling parameters and the one place that turns logits into the distribution we sample from."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hasten.errors import HastenError


@dataclass(frozen=True)
class SamplingParams:
    """``temperature == 0`` means greedy; otherwise sample from the temperature/top-k/top-p distribution."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature):
            raise HastenError(f"temperature must be a finite number, got {self.temperature!r}")
        if self.temperature < 0:
            raise HastenError(f"temperature must be >= 0, got {self.temperature}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise HastenError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise HastenError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> torch.Generator:
        gen = torch.Generator()
        gen.manual_seed(self.seed if self.seed is not None else torch.seed())
        return gen

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Processed probabilities (float32) for a batch of logits rows (..., V). Not for greedy."""
        logits = logits.float() / self.temperature
        if self.top_k and self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            # Drop a token when the mass *before* it already reaches top_p (the first token always stays).
            drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= self.top_p
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        return logits.softmax(-1)


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    """Draw one token id from a probability vector."""
    return int(torch.multinomial(probs, 1, generator=generator))
