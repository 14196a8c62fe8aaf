"""transformers' own decoding as reference rows: plain ``generate``, its prompt lookup and its assisted generation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from hasten.models import LoadedModel
from hasten.sampling import SamplingParams

HF_ANCHORS = ("hf_generate", "hf_pld", "hf_assisted")
HF_PLD_TOKENS = 10


@dataclass
class AnchorOutput:
    """New token ids and how many forward passes of the target produced them (prefill included)."""

    token_ids: list[int]
    target_passes: int


def anchor_available(name: str, draft: LoadedModel | None) -> str | None:
    """Why the anchor ``name`` cannot run, or None if it can."""
    if name == "hf_assisted" and draft is None:
        return "hf_assisted needs a draft model (--draft-model)"
    return None


def run_anchor(name: str, loaded: LoadedModel, ids: list[int], max_new_tokens: int, params: SamplingParams,
               draft: LoadedModel | None = None) -> AnchorOutput:
    """Run ``model.generate`` the way the anchor ``name`` says; counts target forward calls with a hook."""
    tokenizer = loaded.tokenizer
    eos = sorted(loaded.eos_token_ids) or None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                              do_sample=not params.greedy, repetition_penalty=1.0)
    if not params.greedy:  # set every processor explicitly: unset values would come from the model's config
        config.temperature = params.temperature
        config.top_k = params.top_k
        config.top_p = params.top_p
    extra: dict = {}
    if name == "hf_pld":
        config.prompt_lookup_num_tokens = HF_PLD_TOKENS
    elif name == "hf_assisted":
        if draft is None:
            raise ValueError("hf_assisted needs a draft model")
        extra["assistant_model"] = draft.model
    elif name != "hf_generate":
        raise ValueError(f"unknown anchor {name!r}")
    calls = 0

    def count(module, args, kwargs) -> None:
        nonlocal calls
        calls += 1

    hook = loaded.model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        inputs = torch.tensor([ids], device=loaded.model.device)
        if not params.greedy and params.seed is not None:
            torch.manual_seed(params.seed)
        with torch.inference_mode():
            out = loaded.model.generate(inputs, attention_mask=torch.ones_like(inputs), generation_config=config,
                                        **extra)
    finally:
        hook.remove()
    return AnchorOutput(out[0, len(ids):].tolist(), calls)
