"""The distilled draft as a backend the draft proposer runs: torch on transformers, its GGUF export on llama.cpp."""

from __future__ import annotations

from pathlib import Path

import torch

from hasten.adaptive.cost import cpuinfo
from hasten.backends.base import ModelBackend
from hasten.backends.transformers.target import TransformersModel
from hasten.draft.model import SHIPPED_DRAFT, check_fits, load_draft_on, read_draft_dir
from hasten.per_model import once_per_model

GGUF_WEIGHTS = "f16"  # the exported draft's layer weights on llama.cpp (f16: the stored precision)


def load_draft_backend(target: ModelBackend, directory: str | Path = SHIPPED_DRAFT,
                       weights: str = GGUF_WEIGHTS) -> tuple[ModelBackend, torch.Tensor, dict]:
    """A saved draft as a backend the draft proposer runs: (backend, vocab ids, config).

    On a llama.cpp target it is the draft exported to a reduced GGUF (written once to a cache) in its own llama.cpp
    context, fed the target's token embeddings; on transformers, the torch draft.
    """
    if target.backend != "llamacpp":
        draft, vocab_ids, config = load_draft_on(target, directory)
        if _bfloat16_pays(target):
            draft = _in_bfloat16(draft)
        return TransformersModel(draft), vocab_ids, config
    from hasten.backends.llamacpp.embedding_input import ReducedDraftModel
    from hasten.draft.gguf_export import cached_export

    tensors, vocab_ids, config = read_draft_dir(directory)
    check_fits(config, vocab_ids, target.hidden_size, target.vocab_size, directory)
    path = target.path  # type: ignore[attr-defined]
    exported = cached_export(directory, path, weights)
    return ReducedDraftModel(exported, path, threads=getattr(target, "threads", None)), vocab_ids, config


def _bfloat16_pays(target: ModelBackend) -> bool:
    """Whether the draft runs faster in bfloat16 than in the target's float32: on a CPU with native bfloat16
    arithmetic (``avx512_bf16`` or ``amx_bf16``), where a draft pass costs ~4.5 ms against ~6-8 ms in float32 on the
    2-core EPYC (AVX2-only CPUs emulate it, and wide passes cost more there). The draft only proposes, so its
    precision never changes the output."""
    if torch.device(getattr(target, "device", "cpu")).type != "cpu" or getattr(target, "dtype", None) != torch.float32:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set((cpuinfo("flags") or "").split()))


def _in_bfloat16(draft: torch.nn.Module) -> torch.nn.Module:
    """The draft in bfloat16 with its own copy of the embedding table (the target's shared table stays as it is)."""
    table = draft.get_input_embeddings().weight.detach().to(torch.bfloat16)
    draft.set_input_embeddings(torch.nn.Embedding.from_pretrained(table, freeze=True))
    return draft.to(torch.bfloat16)


@once_per_model
def shipped_draft(target: ModelBackend) -> tuple[ModelBackend, torch.Tensor, dict]:
    """The draft that ships with hasten, distilled from the default model, on ``target`` (loaded once per model)."""
    return load_draft_backend(target, SHIPPED_DRAFT)
