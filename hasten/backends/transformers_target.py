"""The transformers backend: any causal LM that honours 4-D attention masks and explicit position ids."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache, PretrainedConfig, PreTrainedModel

from hasten.backends.base import Scores, is_chain, tree_depths
from hasten.errors import HastenError

# Architectures whose attention takes a custom 4-D mask with explicit position ids (checked in the tests).
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3_text", "phi3", "olmo2"})
SUPPORTED_ATTENTION = frozenset({"sdpa", "eager"})
DEFAULT_CONTEXT = 2048  # for a config without max_position_embeddings


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


def ancestor_mask(parents: Sequence[int]) -> torch.Tensor:
    """Bool (n, n): token i may attend to token j when j is i or one of its ancestors."""
    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i, parent in enumerate(parents):
        if parent >= 0:
            mask[i] = mask[parent]
        mask[i, i] = True
    return mask


class TransformersModel:
    """A transformers causal LM as a ``ModelBackend``."""

    backend = "transformers"

    def __init__(self, model: PreTrainedModel) -> None:
        check_supported(model)
        self.model = model
        config = model.config
        self.architecture = str(config.model_type)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.max_context = int(getattr(config, "max_position_embeddings", None) or DEFAULT_CONTEXT)
        self.hidden_size = int(config.hidden_size)
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None) or ()
        self.sliding_window: int | None = int(window) if window and "sliding_attention" in layer_types else None

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def eos_token_ids(self) -> frozenset[int]:
        ids = self.model.generation_config.eos_token_id
        if ids is None:
            ids = self.model.config.eos_token_id
        if ids is None:
            return frozenset()
        return frozenset(ids if isinstance(ids, list) else [ids])

    def new_target(self, want_hidden: bool = False) -> TransformersTarget:
        return TransformersTarget(self, want_hidden)

    def input_embeddings(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight.detach()

    def output_embeddings(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight.detach()

    def transformers_config(self) -> PretrainedConfig:
        return self.model.config


class TransformersTarget:
    """One sequence on a transformers model: a ``DynamicCache`` plus tree-masked scoring passes.

    A tree pass gets a float additive 4-D mask (right for sdpa and eager). For models with sliding-window
    layers (Gemma 2/3), those layers get their own mask, the ancestor mask cut to the window, so trees stay
    exact past the window.
    """

    def __init__(self, backend: TransformersModel | PreTrainedModel, want_hidden: bool = False) -> None:
        if not isinstance(backend, TransformersModel):
            backend = TransformersModel(backend)
        self.backend = backend
        self.model = backend.model
        self.want_hidden = want_hidden
        self.vocab_size = backend.vocab_size
        self.max_context = backend.max_context
        self.device = self.model.device
        self.dtype = self.model.dtype
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
        if len(context) >= self.max_context:
            raise HastenError(f"the sequence would exceed the model's context of {self.max_context} tokens")
        ids = torch.tensor([context], device=self.device)
        out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1,
                         output_hidden_states=self.want_hidden)
        self.cache_len = len(context)
        hidden = out.hidden_states[-1][0, -1:] if self.want_hidden else None
        return Scores(out.logits[0].float(), hidden)

    def _mask(self, parents: list[int], positions: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        n, past = len(parents), self.cache_len
        allowed = torch.ones(n, past + n, dtype=torch.bool)
        allowed[:, past:] = ancestor_mask(parents)
        masks = {"full_attention": allowed}
        if self.backend.sliding_window is not None:
            key_positions = torch.cat([torch.arange(past), positions])
            near = positions[:, None] - key_positions[None, :] < self.backend.sliding_window
            masks["sliding_attention"] = allowed & near
        additive = {}
        for kind, mask in masks.items():
            bias = torch.zeros(1, 1, n, past + n, dtype=self.dtype)
            bias.masked_fill_(~mask, torch.finfo(self.dtype).min)
            additive[kind] = bias.to(self.device)
        return additive if len(additive) > 1 else additive["full_attention"]

    @torch.inference_mode()
    def score(self, tokens: list[int], parents: list[int], logits_rows: Sequence[int] | None = None) -> Scores:
        if self._pending:
            raise RuntimeError("commit() the previous pass before scoring again")
        depths = tree_depths(parents)
        if len(tokens) != len(parents) or not tokens:
            raise ValueError("a pass needs one parent per token and at least the root")
        if self.cache_len + max(depths) >= self.max_context:
            raise HastenError(f"the sequence would exceed the model's context of {self.max_context} tokens")
        positions = torch.tensor(depths) + self.cache_len
        chain = is_chain(parents)
        # transformers builds a chain's causal mask itself, except where a sliding window needs our positions.
        attention = None if chain and self.backend.sliding_window is None else self._mask(parents, positions)
        rows = torch.arange(len(tokens)) if logits_rows is None else torch.tensor(list(logits_rows), dtype=torch.long)
        out = self.model(
            input_ids=torch.tensor([tokens], device=self.device),
            position_ids=positions[None].to(self.device),
            attention_mask=attention,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=rows.to(self.device),
            output_hidden_states=self.want_hidden,
        )
        self._pending = len(tokens)
        hidden = out.hidden_states[-1][0, rows.to(self.device)] if self.want_hidden else None
        return Scores(out.logits[0].float(), hidden)

    def commit(self, keep: list[int]) -> None:
        n, self._pending = self._pending, 0
        if keep == list(range(len(keep))):
            dropped = n - len(keep)
            if dropped:  # crop(0) empties the cache on transformers 5.0-5.13
                self.cache.crop(-dropped)
        else:
            index = torch.tensor(keep, device=self.device) + self.cache_len
            for layer in self.cache.layers:
                layer.keys = torch.cat([layer.keys[:, :, : self.cache_len], layer.keys[:, :, index]], dim=2)
                layer.values = torch.cat([layer.values[:, :, : self.cache_len], layer.values[:, :, index]], dim=2)
        self.cache_len += len(keep)

    def truncate(self, length: int) -> None:
        if self._pending:
            raise RuntimeError("commit() the previous pass before truncating")
        if length < self.cache_len:
            self.cache.crop(-(self.cache_len - length))
            self.cache_len = length

    def cached_length(self) -> int:
        """The cache's own length (equals ``cache_len`` between passes)."""
        return int(self.cache.get_seq_length())
