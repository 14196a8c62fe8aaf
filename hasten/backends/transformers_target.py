"""The transformers backend: any causal LM that honours 4-D attention masks and explicit position ids."""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel

from hasten.backends.base import Scores
from hasten.errors import HastenError

# Architectures whose attention takes a custom 4-D mask with explicit position ids (checked in the tests).
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3_text", "phi3", "olmo2"})
SUPPORTED_ATTENTION = frozenset({"sdpa", "eager"})


def check_supported(model: PreTrainedModel) -> None:
    """Refuse, with a clear message, a model the tree verifier cannot drive."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise HastenError(
            f"model type {model_type!r} is not supported: hasten verifies trees through 4-D attention masks, "
            f"tested on {', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
        )
    attention = getattr(model.config, "_attn_implementation", None)
    if attention not in SUPPORTED_ATTENTION:
        raise HastenError(f"attention implementation {attention!r} is not supported; load with sdpa or eager")


class TransformersTarget:
    """One sequence on a transformers model: a ``DynamicCache`` plus tree-masked scoring passes."""

    def __init__(self, model: PreTrainedModel, want_hidden: bool = False) -> None:
        check_supported(model)
        self.model = model
        self.want_hidden = want_hidden
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.max_context = int(getattr(model.config, "max_position_embeddings", 2048))
        self.device = model.device
        self.dtype = model.dtype
        self.cache = DynamicCache()
        self.cache_len = 0
        self._pending = 0  # tokens appended by the last pass, not yet committed

    @torch.inference_mode()
    def start(self, context: list[int]) -> Scores:
        self.cache = DynamicCache()
        self.cache_len = 0
        self._pending = 0
        if not context:
            return Scores(torch.empty(0, self.vocab_size))
        ids = torch.tensor([context], device=self.device)
        out = self.model(
            input_ids=ids,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
            output_hidden_states=self.want_hidden,
        )
        self.cache_len = len(context)
        hidden = out.hidden_states[-1][0, -1:] if self.want_hidden else None
        return Scores(out.logits[0].float(), hidden)

    @torch.inference_mode()
    def score(self, tokens: list[int], offsets: list[int], mask: torch.Tensor | None) -> Scores:
        if self._pending:
            raise RuntimeError("commit() the previous pass before scoring again")
        n = len(tokens)
        if self.cache_len + max(offsets) >= self.max_context:
            raise HastenError(f"the sequence would exceed the model's context of {self.max_context} tokens")
        ids = torch.tensor([tokens], device=self.device)
        positions = torch.tensor([offsets], device=self.device) + self.cache_len
        attention = None
        if mask is not None:
            allowed = torch.ones(n, self.cache_len + n, dtype=torch.bool)
            allowed[:, self.cache_len :] = mask
            attention = torch.zeros(1, 1, n, self.cache_len + n, dtype=self.dtype)
            attention.masked_fill_(~allowed, torch.finfo(self.dtype).min)
            attention = attention.to(self.device)
        out = self.model(
            input_ids=ids,
            position_ids=positions,
            attention_mask=attention,
            past_key_values=self.cache,
            use_cache=True,
            output_hidden_states=self.want_hidden,
        )
        self._pending = n
        hidden = out.hidden_states[-1][0] if self.want_hidden else None
        return Scores(out.logits[0].float(), hidden)

    def commit(self, keep: list[int]) -> None:
        n, self._pending = self._pending, 0
        if keep == list(range(len(keep))):
            self.cache.crop(-(n - len(keep)))
        else:
            index = torch.tensor(keep, device=self.device) + self.cache_len
            for layer in self.cache.layers:
                layer.keys = torch.cat([layer.keys[:, :, : self.cache_len], layer.keys[:, :, index]], dim=2)
                layer.values = torch.cat([layer.values[:, :, : self.cache_len], layer.values[:, :, index]], dim=2)
        self.cache_len += len(keep)

    def truncate(self, length: int) -> None:
        if self._pending:
            raise RuntimeError("commit() the previous pass before truncating")
        self.cache.crop(-(self.cache_len - length))
        self.cache_len = length
