"""transformers' own ``model.generate`` on a loaded model, as the benchmark's reference rows run it: plain greedy or
sampled decoding, its prompt lookup, its assisted generation with a draft model, or its static KV cache; the
target's forward calls counted and its first one (the prefill) timed."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
from transformers import GenerationConfig

from hasten.sampling import SamplingParams


@dataclass
class Generated:
    """New token ids, the target's forward calls that made them (None: not counted) and the prefill's time (the
    first forward call; None: not measured)."""

    token_ids: list[int]
    forward_calls: int | None
    prefill_s: float | None


@contextlib.contextmanager
def first_pass_timer(model: torch.nn.Module, clock: Callable[[], float]) -> Iterator[list[float]]:
    """Time the model's next forward call with ``clock`` into the list yielded, then unhook.

    The hooks remove themselves after that call, so the later passes (compiled ones included: transformers
    compiles the decoding steps, never the prefill) run without them.
    """
    timed: list[float] = []
    began: list[float] = []

    def before(module: Any, args: Any, kwargs: Any) -> None:
        began.append(clock())

    def after(module: Any, args: Any, kwargs: Any, output: Any) -> None:
        timed.append(clock() - began[0])
        pre.remove()
        post.remove()

    pre = torch.nn.Module.register_forward_pre_hook(model, before, with_kwargs=True)
    post = torch.nn.Module.register_forward_hook(model, after, with_kwargs=True)
    try:
        yield timed
    finally:
        pre.remove()
        post.remove()


def generation_config(max_new_tokens: int, params: SamplingParams, eos: list[int] | None, pad: int, *,
                      prompt_lookup: int | None = None, static: bool = False) -> GenerationConfig:
    """``params`` as transformers' settings, every processor set (unset values would come from the model's
    config); ``prompt_lookup``: its prompt lookup with that many tokens; ``static``: its static KV cache, which
    transformers compiles on an accelerator."""
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                              do_sample=not params.greedy, repetition_penalty=1.0)
    if not params.greedy:
        config.temperature = params.temperature
        config.top_k = params.top_k
        config.top_p = params.top_p
    if prompt_lookup is not None:
        config.prompt_lookup_num_tokens = prompt_lookup
    if static:
        config.cache_implementation = "static"
    return config


def generate_ids(model: Any, ids: list[int], config: GenerationConfig, clock: Callable[[], float], *,
                 assistant: Any = None, seed: int | None = None, count: bool = True) -> Generated:
    """One ``model.generate`` call on the model's device (seeded first when sampling; ``assistant``: transformers'
    assisted generation with that draft model). ``count``: the target's forward calls, by a hook (none inside
    compiled code: leave it off for a static cache). The prefill is timed by hooks that remove themselves after
    it."""
    calls = 0

    def counted(module: Any, args: Any, kwargs: Any) -> None:
        nonlocal calls
        calls += 1

    hook = torch.nn.Module.register_forward_pre_hook(model, counted, with_kwargs=True) if count else None
    inputs = torch.tensor([ids], device=model.device)
    extra = {} if assistant is None else {"assistant_model": assistant}
    try:
        with first_pass_timer(model, clock) as prefill:
            if config.do_sample and seed is not None:
                torch.manual_seed(seed)
            with torch.inference_mode():
                out = cast(Any, model).generate(inputs, attention_mask=torch.ones_like(inputs),
                                                generation_config=config, **extra)
    finally:
        if hook is not None:
            hook.remove()
    return Generated(out[0, len(ids):].tolist(), calls if count else None, prefill[0] if prefill else None)


__all__ = ["Generated", "first_pass_timer", "generate_ids", "generation_config"]
