"""The distilled draft as a backend the draft proposer runs: torch on transformers, its GGUF export on llama.cpp."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from hasten.adaptive.cost import chain, cpuinfo, fastest
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
        return TransformersModel(_fastest_precision(target, draft)), vocab_ids, config
    from hasten.backends.llamacpp.embedding_input import ReducedDraftModel
    from hasten.draft.gguf_export import cached_export

    tensors, vocab_ids, config = read_draft_dir(directory)
    check_fits(config, vocab_ids, target.hidden_size, target.vocab_size, directory)
    path = target.path  # type: ignore[attr-defined]
    exported = cached_export(directory, path, weights)
    return ReducedDraftModel(exported, path, threads=getattr(target, "threads", None)), vocab_ids, config


def _fastest_precision(target: ModelBackend, draft: torch.nn.Module) -> torch.nn.Module:
    """The draft in bfloat16 where that runs its passes faster than the target's float32, timed, else as it is.

    Only CPUs with native bfloat16 arithmetic (``avx512_bf16`` or ``amx_bf16``) are asked (AVX2-only CPUs emulate
    it). The answer differs by CPU and width: on the 2-core AMD EPYC a draft pass took ~4.5 ms in bfloat16 against
    ~6-8 ms in float32; on a 2-core Intel Xeon with AMX one token 3.8 against 2.5 ms, sixteen 4.2 against 4.9. The
    draft only proposes, so its precision never changes the output."""
    if torch.device(getattr(target, "device", "cpu")).type != "cpu" or getattr(target, "dtype", None) != torch.float32:
        return draft
    if not {"avx512_bf16", "amx_bf16"} & set((cpuinfo("flags") or "").split()):
        return draft
    shared = draft.get_input_embeddings().weight  # the target's table: the copy refers to it, never copies it
    halved = _in_bfloat16(copy.deepcopy(draft, memo={id(shared): shared}))
    return halved if _tree_passes_ms(halved) < _tree_passes_ms(draft) else draft


def _tree_passes_ms(draft: torch.nn.Module) -> float:
    """What a draft tree's passes cost (1, 4 and 16 tokens after 64 cached ones, the fastest of three each), in ms."""
    target = TransformersModel(draft).new_target()
    target.start([(7 * i + 3) % target.vocab_size for i in range(64)])
    return sum(fastest(target, {width: chain(width) for width in (1, 4, 16)}, 3, time.perf_counter).values())


def _in_bfloat16(draft: torch.nn.Module) -> torch.nn.Module:
    """The draft in bfloat16 with its own copy of the embedding table (the target's shared table stays as it is)."""
    table = draft.get_input_embeddings().weight.detach().to(torch.bfloat16)
    draft.set_input_embeddings(torch.nn.Embedding.from_pretrained(table, freeze=True))
    return draft.to(torch.bfloat16)


@once_per_model
def shipped_draft(target: ModelBackend) -> tuple[ModelBackend, torch.Tensor, dict]:
    """The draft that ships with hasten, distilled from the default model, on ``target`` (loaded once per model)."""
    return load_draft_backend(target, SHIPPED_DRAFT)
