"""A small distilled draft: a few llama layers on the target's frozen embeddings, with a reduced output vocabulary.

The draft shares the target's input embeddings (not stored) and its output head is the target's own head
restricted to ``vocab_ids``, the most frequent tokens of the target's answers (not stored either: only the ids).
What is stored is the trained layers and final norm (safetensors) plus a JSON config, a few MB in fp16.
Its logits cover ``vocab_ids`` only; ``ReducedVocabDraftProposer`` maps them back to the full vocabulary.
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from hasten.errors import HastenError
from hasten.models import LoadedModel
from hasten.proposers.reduced_draft import ReducedVocabDraftProposer
from hasten.sampling import SamplingParams

SHIPPED_DRAFT = Path(__file__).parent / "artifacts" / "draft"
WEIGHTS = "draft.safetensors"
CONFIG = "config.json"


def _target_head(target: PreTrainedModel) -> torch.Tensor:
    return target.get_output_embeddings().weight


def build_draft(target: PreTrainedModel, vocab_ids: torch.Tensor, init_layers: list[int]) -> LlamaForCausalLM:
    """A llama draft with ``len(init_layers)`` layers copied from the target's, sharing its embeddings.

    The output head is a frozen copy of the target's head rows ``vocab_ids``; the embeddings are the target's
    own module (shared, frozen). Only the layers and the final norm are meant to be trained.
    """
    config = target.config
    if getattr(config, "model_type", None) != "llama":
        raise HastenError(f"the distilled draft needs a llama target, got {getattr(config, 'model_type', None)!r}")
    layers = len(target.model.layers)
    if not init_layers or any(not 0 <= i < layers for i in init_layers):
        raise HastenError(f"draft layers must be indices of the target's {layers} layers, got {init_layers}")
    draft_config = LlamaConfig(**{
        **{key: getattr(config, key) for key in (
            "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
            "hidden_act", "rms_norm_eps", "max_position_embeddings", "rope_parameters", "bos_token_id",
            "eos_token_id", "pad_token_id", "attention_bias", "mlp_bias")},
        "num_hidden_layers": len(init_layers),
        "vocab_size": len(vocab_ids),  # the head's rows; inputs go through the target's full embedding module
        "tie_word_embeddings": False,
        "attn_implementation": "sdpa",
    })
    draft = LlamaForCausalLM(draft_config)
    draft.model.embed_tokens = target.get_input_embeddings()
    for mine, theirs in zip(draft.model.layers, init_layers, strict=True):
        mine.load_state_dict(target.model.layers[theirs].state_dict())
    draft.model.norm.load_state_dict(target.model.norm.state_dict())
    with torch.no_grad():
        draft.lm_head.weight.copy_(_target_head(target)[vocab_ids])
    draft.lm_head.weight.requires_grad_(False)
    draft.model.embed_tokens.weight.requires_grad_(False)
    draft.generation_config.eos_token_id = target.generation_config.eos_token_id
    return draft.to(target.dtype).eval()


def trainable_state(draft: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """The parameters that are stored: the layers and the final norm (not the shared embeddings or head)."""
    return {name: p.detach() for name, p in draft.named_parameters()
            if name.startswith("model.layers.") or name.startswith("model.norm.")}


def save_draft(draft: LlamaForCausalLM, vocab_ids: torch.Tensor, directory: str | Path, info: dict[str, Any],
               dtype: torch.dtype = torch.float16) -> None:
    """Write ``draft.safetensors`` (layers, norm, vocab ids) and ``config.json`` (``info`` plus the shapes)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.to(dtype).contiguous() for name, t in trainable_state(draft).items()}
    tensors["vocab_ids"] = vocab_ids.to(torch.int64).contiguous()
    save_file(tensors, str(directory / WEIGHTS))
    config = {**info, "num_layers": draft.config.num_hidden_layers, "draft_vocab": len(vocab_ids),
              "hidden_size": draft.config.hidden_size, "dtype": str(dtype).removeprefix("torch.")}
    (directory / CONFIG).write_text(json.dumps(config, indent=1))


def load_draft_dir(target: PreTrainedModel, directory: str | Path) -> tuple[LlamaForCausalLM, torch.Tensor, dict]:
    """Rebuild a saved draft on ``target``: returns (draft model, vocab ids, config)."""
    directory = Path(directory)
    if not (directory / WEIGHTS).is_file() or not (directory / CONFIG).is_file():
        raise HastenError(f"{directory} holds no distilled draft ({WEIGHTS} and {CONFIG})")
    config = json.loads((directory / CONFIG).read_text())
    tensors = load_file(str(directory / WEIGHTS))
    vocab_ids = tensors.pop("vocab_ids")
    if config["hidden_size"] != target.config.hidden_size or int(vocab_ids.max()) >= _target_head(target).shape[0]:
        raise HastenError(f"the draft in {directory} was not trained for this target (hidden size or vocabulary)")
    draft = build_draft(target, vocab_ids, config["init_layers"])
    missing = set(trainable_state(draft)) - set(tensors)
    if missing:
        raise HastenError(f"the draft in {directory} lacks {sorted(missing)[0]}")
    draft.load_state_dict({k: v.to(target.dtype) for k, v in tensors.items()}, strict=False)
    return draft.eval(), vocab_ids, config


def load_shipped_draft(target: PreTrainedModel) -> tuple[LlamaForCausalLM, torch.Tensor, dict]:
    """The draft distilled from the default SmolLM2-135M-Instruct and shipped with hasten."""
    return load_draft_dir(target, SHIPPED_DRAFT)


_SHIPPED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def shipped_draft_proposer(target: LoadedModel, params: SamplingParams, num_tokens: int | None,
                           generator: torch.Generator | None) -> ReducedVocabDraftProposer:
    """``--method draft`` on the default model without ``--draft-model``: the shipped draft (loaded once)."""
    if target.model not in _SHIPPED:
        _SHIPPED[target.model] = load_shipped_draft(target.model)
    draft, vocab_ids, config = _SHIPPED[target.model]
    vocab_size = target.model.get_output_embeddings().weight.shape[0]
    return ReducedVocabDraftProposer(draft, vocab_ids, vocab_size, params,
                                     num_tokens=num_tokens or config.get("num_tokens", 4), generator=generator)
