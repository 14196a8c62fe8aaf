"""A small distilled draft: a few llama layers on the target's frozen embeddings, with a reduced output vocabulary.

The draft shares the target's input embeddings (not stored) and its output head is the target's own head
restricted to ``vocab_ids``, the most frequent tokens of the target's answers (not stored either: only the ids).
What is stored is the trained layers and final norm (safetensors) plus a JSON config, a few MB in fp16.
Its logits cover ``vocab_ids`` only; ``ReducedVocabDraftProposer`` maps them back to the full vocabulary.
``hasten.draft.backend`` runs it (torch, or its GGUF export on llama.cpp).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel

from hasten.backends.base import ModelBackend
from hasten.backends.transformers.target import TransformersModel
from hasten.errors import HastenError

SHIPPED_DRAFT = Path(__file__).resolve().parent.parent / "artifacts" / "draft"
WEIGHTS = "draft.safetensors"
CONFIG = "config.json"
HELD_OUT_TOP1 = "held_out_top1"  # the config's bench-like agreement (``bench_like_agreement``)


DRAFT_CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                     "hidden_act", "rms_norm_eps", "max_position_embeddings", "rope_parameters", "bos_token_id",
                     "eos_token_id", "pad_token_id", "attention_bias", "mlp_bias")


def assemble_draft(config: PretrainedConfig, embeddings: torch.Tensor, head_rows: torch.Tensor,
                   num_layers: int) -> LlamaForCausalLM:
    """A llama draft of ``num_layers`` fresh layers on the target's (frozen) embeddings and output rows.

    ``config`` is the target's; ``embeddings`` its input table (V, E); ``head_rows`` its output rows of the
    draft vocabulary (draft vocab, H). Only the layers and the final norm are meant to be trained or loaded.
    """
    if getattr(config, "model_type", None) != "llama":
        raise HastenError(f"the distilled draft needs a llama target, got {getattr(config, 'model_type', None)!r}")
    draft_config = LlamaConfig(**{
        **{key: getattr(config, key) for key in DRAFT_CONFIG_KEYS if hasattr(config, key)},
        "num_hidden_layers": num_layers,
        "vocab_size": head_rows.shape[0],  # the head's rows; inputs go through the target's full embedding table
        "tie_word_embeddings": False,
        "attn_implementation": "sdpa",
    })
    draft = LlamaForCausalLM(draft_config)
    draft.model.embed_tokens = torch.nn.Embedding.from_pretrained(embeddings, freeze=True)
    with torch.no_grad():
        draft.lm_head.weight.copy_(head_rows)
    draft.lm_head.weight.requires_grad_(False)
    draft.generation_config.eos_token_id = config.eos_token_id
    return draft.eval()


def build_draft(target: PreTrainedModel, vocab_ids: torch.Tensor, init_layers: list[int]) -> LlamaForCausalLM:
    """A llama draft with ``len(init_layers)`` layers copied from the target's, sharing its embeddings.

    The output head is a frozen copy of the target's head rows ``vocab_ids``; the embeddings are the target's
    own module (shared, frozen). Only the layers and the final norm are meant to be trained.
    """
    if getattr(target.config, "model_type", None) != "llama":
        raise HastenError(
            f"the distilled draft needs a llama target, got {getattr(target.config, 'model_type', None)!r}")
    layers = len(target.model.layers)
    if not init_layers or any(not 0 <= i < layers for i in init_layers):
        raise HastenError(f"draft layers must be indices of the target's {layers} layers, got {init_layers}")
    head = target.get_output_embeddings().weight.detach()
    draft = assemble_draft(target.config, target.get_input_embeddings().weight.detach(), head[vocab_ids],
                           len(init_layers))
    draft.model.embed_tokens = target.get_input_embeddings()
    for mine, theirs in zip(draft.model.layers, init_layers, strict=True):
        mine.load_state_dict(target.model.layers[theirs].state_dict())
    draft.model.norm.load_state_dict(target.model.norm.state_dict())
    draft.model.embed_tokens.weight.requires_grad_(False)
    draft.generation_config.eos_token_id = target.generation_config.eos_token_id
    return draft.to(device=target.device, dtype=target.dtype).eval()  # beside the target's shared embeddings


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


@functools.lru_cache(maxsize=8)
def validation_agreement(directory: str | Path = SHIPPED_DRAFT) -> float:
    """A saved draft's last validation top-1 agreement with its target (1.0 where its config records none); read
    once per folder (``auto`` asks for every request)."""
    history = json.loads((Path(directory) / CONFIG).read_text()).get("history") or [{}]
    return float(history[-1].get("val_top1", 1.0))


@functools.lru_cache(maxsize=8)
def bench_like_agreement(directory: str | Path = SHIPPED_DRAFT) -> float | None:
    """A saved draft's top-1 agreement with its target's greedy answers to held-out prompts of every bench category
    (``held_out_top1`` in its config, written by ``scripts/drafter_agreement.py``), or None where it records none;
    read once per folder. Unlike ``validation_agreement`` it is measured on prompts like those the draft serves."""
    value = json.loads((Path(directory) / CONFIG).read_text()).get(HELD_OUT_TOP1)
    return None if value is None else float(value)


def read_draft_dir(directory: str | Path) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, Any]]:
    """The stored layers, the vocabulary ids and the config of a saved draft."""
    directory = Path(directory)
    if not (directory / WEIGHTS).is_file() or not (directory / CONFIG).is_file():
        raise HastenError(f"{directory} holds no distilled draft ({WEIGHTS} and {CONFIG})")
    config = json.loads((directory / CONFIG).read_text())
    tensors = load_file(str(directory / WEIGHTS))
    return tensors, tensors.pop("vocab_ids"), config


def _load_layers(draft: LlamaForCausalLM, tensors: dict[str, torch.Tensor], directory: str | Path) -> None:
    missing = set(trainable_state(draft)) - set(tensors)
    if missing:
        raise HastenError(f"the draft in {directory} lacks {sorted(missing)[0]}")
    dtype = draft.lm_head.weight.dtype
    draft.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=False)


def check_fits(config: dict[str, Any], vocab_ids: torch.Tensor, hidden: int, vocab: int, directory) -> None:
    if config["hidden_size"] != hidden or int(vocab_ids.max()) >= vocab:
        raise HastenError(f"the draft in {directory} was not trained for this target (hidden size or vocabulary)")


def load_draft_dir(target: PreTrainedModel, directory: str | Path) -> tuple[LlamaForCausalLM, torch.Tensor, dict]:
    """Rebuild a saved draft on a transformers ``target``: returns (draft model, vocab ids, config)."""
    tensors, vocab_ids, config = read_draft_dir(directory)
    check_fits(config, vocab_ids, target.config.hidden_size, target.get_output_embeddings().weight.shape[0],
                directory)
    draft = build_draft(target, vocab_ids, config["init_layers"])
    _load_layers(draft, tensors, directory)
    return draft.eval(), vocab_ids, config


def load_draft_on(target: ModelBackend, directory: str | Path) -> tuple[LlamaForCausalLM, torch.Tensor, dict]:
    """Rebuild a saved draft in torch on any backend from its config and borrowed embedding tables."""
    if isinstance(target, TransformersModel):
        return load_draft_dir(target.model, directory)
    tensors, vocab_ids, config = read_draft_dir(directory)
    check_fits(config, vocab_ids, target.hidden_size, target.vocab_size, directory)
    head_rows = target.output_embeddings()[vocab_ids].contiguous()
    draft = assemble_draft(target.transformers_config(), target.input_embeddings(), head_rows, config["num_layers"])
    _load_layers(draft, tensors, directory)
    return draft.eval(), vocab_ids, config
