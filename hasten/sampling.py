"""Sampling parameters and the one place that turns logits into the distribution we sample from."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hasten.errors import HastenError

MIN_TEMPERATURE = 1e-5  # below this, sampling is greedy decoding (vLLM's rule): logits / T would overflow


@dataclass(frozen=True)
class SamplingParams:
    """Greedy decoding when ``temperature < MIN_TEMPERATURE`` (1e-5, so 0 included, as vLLM treats them);
    otherwise sampling from the temperature / top-k / top-p distribution (``top_k == 0`` and ``top_p == 1``
    disable those filters; they act as transformers' ``TopKLogitsWarper`` then ``TopPLogitsWarper``).
    """

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
        return self.temperature < MIN_TEMPERATURE

    def generator(self) -> torch.Generator:
        """A private generator: seeded with ``seed``, else from fresh OS entropy; the global RNG is never touched."""
        gen = torch.Generator()
        if self.seed is not None:
            gen.manual_seed(self.seed)
        else:
            gen.seed()
        return gen

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Processed probabilities (float32) for logits rows (..., V); under greedy, a point mass at the argmax."""
        logits = logits.float()
        if self.greedy:
            return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        logits = logits / self.temperature
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
