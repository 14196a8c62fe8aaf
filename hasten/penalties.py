"""Repetition penalties and logit bias: the target's logits reshaped by the tokens before each position.

The rules follow vLLM and OpenAI: ``repetition_penalty`` (transformers' rule: a positive logit is divided by
it, a negative one multiplied) counts every token of the prompt and the answer; ``presence_penalty`` and
``frequency_penalty`` count the answer's tokens only (minus ``presence`` once a token has appeared, minus
``frequency`` per appearance); ``logit_bias`` adds a fixed amount per token id. Under speculation each tree node
is shaped by the tokens on its own path, so the result equals plain decoding with the same penalties.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from hasten.errors import HastenError

MAX_PENALTY = 2.0  # OpenAI's range for presence and frequency penalties: [-2, 2]
MAX_BIAS = 100.0  # OpenAI's range for a logit bias: [-100, 100]


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise HastenError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Penalties:
    """What reshapes the logits before sampling; the defaults change nothing."""

    presence: float = 0.0
    frequency: float = 0.0
    repetition: float = 1.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, value in (("presence_penalty", self.presence), ("frequency_penalty", self.frequency)):
            if abs(_number(name, value)) > MAX_PENALTY:
                raise HastenError(f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value}")
        if not _number("repetition_penalty", self.repetition) > 0:
            raise HastenError(f"repetition_penalty must be > 0, got {self.repetition}")
        if not isinstance(self.logit_bias, Mapping):
            raise HastenError("logit_bias must map token ids to numbers")
        for token, bias in self.logit_bias.items():
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise HastenError(f"logit_bias keys must be token ids (integers >= 0), got {token!r}")
            if abs(_number(f"logit_bias[{token}]", bias)) > MAX_BIAS:
                raise HastenError(f"logit_bias[{token}] must be in [-{MAX_BIAS:g}, {MAX_BIAS:g}], got {bias}")

    @property
    def active(self) -> bool:
        return bool(self.presence or self.frequency or self.repetition != 1.0 or self.logit_bias)

    def check_vocabulary(self, vocab_size: int) -> None:
        bad = next((token for token in self.logit_bias if token >= vocab_size), None)
        if bad is not None:
            raise HastenError(f"logit_bias token id {bad} is outside the vocabulary (0..{vocab_size - 1})")


class PenaltyState:
    """The counts the penalties read, for one sequence: the prompt's tokens and the answer's so far."""

    def __init__(self, penalties: Penalties, prompt: Sequence[int], vocab_size: int) -> None:
        self.penalties = penalties
        self.answer_counts = torch.zeros(vocab_size)
        self.seen = torch.zeros(vocab_size, dtype=torch.bool)
        self.seen[torch.tensor(list(prompt), dtype=torch.long)] = True
        tokens, values = zip(*penalties.logit_bias.items(), strict=True) if penalties.logit_bias else ((), ())
        self.bias_tokens = torch.tensor(tokens, dtype=torch.long)
        self.bias_values = torch.tensor(values, dtype=torch.float32)

    def _move(self, device: torch.device) -> None:
        """Keep the counts where the logits are (moved once, not per row)."""
        if self.answer_counts.device != device:
            self.answer_counts, self.seen = self.answer_counts.to(device), self.seen.to(device)
            self.bias_tokens, self.bias_values = self.bias_tokens.to(device), self.bias_values.to(device)

    def commit(self, tokens: Sequence[int]) -> None:
        """Tokens added to the answer."""
        device = self.answer_counts.device
        index = torch.tensor(list(tokens), dtype=torch.long, device=device)
        self.answer_counts.index_add_(0, index, torch.ones(len(index), device=device))
        self.seen[index] = True

    def shape(self, logits: torch.Tensor, path: Sequence[int]) -> torch.Tensor:
        """One row of logits (float32) after the penalties, for a position ``path`` tokens past the
        answer so far; ``logits`` may be modified in place."""
        rules, device = self.penalties, logits.device
        self._move(device)
        counts, seen = self.answer_counts, self.seen
        if path:
            index = torch.tensor(list(path), dtype=torch.long, device=device)
            counts = counts.index_add(0, index, torch.ones(len(index), device=device))
            seen = seen.clone()
            seen[index] = True
        if rules.repetition != 1.0:
            shaped = torch.where(logits > 0, logits / rules.repetition, logits * rules.repetition)
            logits = torch.where(seen, shaped, logits)
        if rules.frequency:
            logits = logits - rules.frequency * counts
        if rules.presence:
            logits = logits - rules.presence * (counts > 0).float()
        if len(self.bias_tokens):
            logits = logits.index_add(0, self.bias_tokens, self.bias_values)
        return logits
