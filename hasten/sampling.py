"""Sampling parameters and the one place that turns logits into the distribution we sample from."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hasten.errors import HastenError

MIN_TEMPERATURE = 1e-5  # below this, sampling is greedy decoding (vLLM's rule): logits / T would overflow
# Top-p alone (``_nucleus``): logit bins 1/8 apart, 256 of them (32 nats; further below, tokens share the last).
_BIN, _BINS = 0.125, 256


@dataclass(frozen=True)
class SamplingParams:
    """Greedy decoding when ``temperature < MIN_TEMPERATURE`` (1e-5, so 0 included, as vLLM treats them);
    otherwise sampling from the temperature / top-k / top-p distribution (``top_k == 0`` and ``top_p == 1``
    disable those filters; they act as transformers' ``TopKLogitsWarper`` then ``TopPLogitsWarper``), then
    ``min_p`` (0 disables it): tokens less likely than ``min_p`` times the most likely one go (``MinPLogitsWarper``).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    min_p: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature):
            raise HastenError(f"temperature must be a finite number, got {self.temperature!r}")
        if self.temperature < 0:
            raise HastenError(f"temperature must be >= 0, got {self.temperature}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise HastenError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise HastenError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.min_p, bool) or not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p <= 1:
            raise HastenError(f"min_p must be in [0, 1], got {self.min_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """A private generator on ``device`` (where the logits it samples from live, so draws need no copy):
        seeded with ``seed``, else from fresh OS entropy; the global RNG is never touched."""
        gen = torch.Generator(device=device)
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
        if logits.dim() == 1:
            return self._min_p(self._row_probs(logits))
        rows = logits.reshape(-1, logits.shape[-1])
        return torch.stack([self._min_p(self._row_probs(row)) for row in rows]).reshape(logits.shape)

    def _min_p(self, probs: torch.Tensor) -> torch.Tensor:
        """Drop tokens below ``min_p`` times the top probability and renormalize (a ratio, so the same whether
        taken before or after top-k / top-p renormalized the row)."""
        if self.min_p <= 0:
            return probs
        kept = torch.where(probs >= self.min_p * probs.max(), probs, probs.new_zeros(()))
        return kept / kept.sum()

    def _row_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """One row, without sorting the vocabulary: top-k through ``topk`` (ties at the k-th value kept, as in
        ``TopKLogitsWarper``), then top-p on those few; for top-p alone, ``_nucleus`` sorts one bin of logits."""
        vocab = logits.shape[0]
        top_k = self.top_k if 0 < self.top_k < vocab else 0
        if not top_k and self.top_p >= 1.0:
            return logits.softmax(-1)
        if not top_k:
            index = _nucleus(logits, self.top_p)
            values = logits[index]
        else:
            values, index = torch.topk(logits, top_k)
            kept = int((logits >= values[-1]).sum())
            if kept > top_k:
                values, index = torch.topk(logits, kept)
            if self.top_p < 1.0:  # a token goes when the mass before it already reaches top_p (never the first)
                keep = _before(values.double().softmax(-1).cumsum(-1)) < self.top_p
                values, index = values[keep], index[keep]
        return values.new_zeros(vocab).index_put_((index,), values.softmax(-1))


def _before(cumulative: torch.Tensor, start: float = 0.0) -> torch.Tensor:
    """The mass before each token of a descending list, given the list's cumulative sum."""
    return torch.cat([cumulative.new_full((1,), 0.0), cumulative[:-1]]) + start


def _nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Indices that ``TopPLogitsWarper`` keeps: a token stays when the mass of the tokens before it is below top_p.

    Tokens are binned by their logit's distance below the top (``_BIN`` apart; the last bin holds the rest)
    and one accumulating ``index_put_`` gives each bin's mass: the bins above the one where the mass reaches
    top_p stay, the bins below go, and only that one bin is sorted. Probabilities are float64, where
    transformers' ascending float32 cumsum and the exact rule agree (a float32 cumsum from the top of the
    vocabulary drifts by a token now and then). The bin masses are deterministic on CUDA too (sorted by bin, then
    summed; ``bincount`` with weights adds atomically there), and on the CPU the same bits as ``bincount``'s.
    """
    probs = logits.double().softmax(-1)
    bins = ((logits.max() - logits) / _BIN).clamp_(max=_BINS - 1).long()
    mass = probs.new_zeros(_BINS).index_put_((bins,), probs, accumulate=True).cumsum(0)
    edge = min(int(torch.searchsorted(mass, top_p)), _BINS - 1)  # the first bin whose mass reaches top_p
    above = float(mass[edge - 1]) if edge else 0.0
    band = (bins == edge).nonzero().squeeze(-1)
    values, order = probs[band].sort(descending=True)
    keep = _before(values.cumsum(0), above) < top_p
    return torch.cat([(bins < edge).nonzero().squeeze(-1), band[order[keep]]])


def uniform(generator: torch.Generator, like: torch.Tensor, size: tuple[int, ...] = (),
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniforms in [0, 1) drawn by ``generator`` on its own device, then placed beside ``like`` (no copy when
    the generator lives where the tensor does, as ``SamplingParams.generator(device)`` makes it)."""
    return torch.rand(size, generator=generator, dtype=dtype, device=generator.device).to(like.device)


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    """Draw one token id from a probability vector (inverse CDF: one uniform, a cumsum and a binary search).

    The draw stays on the vector's device; the total mass and the token come back to the host together.
    """
    cdf = probs.double().cumsum(-1)
    u = uniform(generator, cdf, (1,), torch.float64) * cdf[-1]
    found = torch.searchsorted(cdf, u, right=True)
    total, token = torch.cat([cdf[-1:], found.double()]).tolist()  # the one sync (exact: ids are < 2**53)
    if not total > 0 or not math.isfinite(total):
        raise ValueError(f"cannot sample from a distribution of total mass {total}")
    if token >= probs.shape[-1]:  # u rounded up to the total: the last token with mass
        return int(probs.nonzero()[-1])
    return int(token)
