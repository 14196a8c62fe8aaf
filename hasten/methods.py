"""The method registry: a name on the command line becomes a proposer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hasten.errors import HastenError
from hasten.models import LoadedModel, load_model
from hasten.proposers.base import Proposer
from hasten.proposers.draft_model import DraftModelProposer, check_same_vocabulary
from hasten.proposers.lookahead import LookaheadProposer
from hasten.proposers.prompt_lookup import PromptLookupProposer
from hasten.proposers.redrafter import ReDrafterProposer, load_head
from hasten.sampling import SamplingParams

# A factory gets the target, the sampling parameters, a generator and the method's options.
Factory = Callable[[LoadedModel, SamplingParams, torch.Generator | None, dict[str, Any]], Proposer]


def _ar(target: LoadedModel, params: SamplingParams, generator, options: dict[str, Any]) -> Proposer:
    return Proposer()


def _pld(target: LoadedModel, params: SamplingParams, generator, options: dict[str, Any]) -> Proposer:
    return PromptLookupProposer(
        num_tokens=options.get("num_tokens") or 8,
        max_ngram=options.get("max_ngram", 3),
        min_ngram=options.get("min_ngram", 2),
        branches=options.get("branches", 1),
    )


def _draft(target: LoadedModel, params: SamplingParams, generator, options: dict[str, Any]) -> Proposer:
    draft = options.get("draft")
    if draft is None and target.name == "default":  # the draft distilled from the default model ships with hasten
        from hasten.draft_head import shipped_draft_proposer

        return shipped_draft_proposer(target, params, options.get("num_tokens"), generator)
    if draft is None:
        raise HastenError("--method draft needs a draft model (--draft-model PATH)")
    return DraftModelProposer(draft.model, params, num_tokens=options.get("num_tokens") or 6, generator=generator)


def _redrafter(target: LoadedModel, params: SamplingParams, generator, options: dict[str, Any]) -> Proposer:
    head = load_head(target.name, target.model, options.get("head"))
    return ReDrafterProposer(head, options.get("beam_width", 2), options.get("beam_length", 5))


def _lookahead(target: LoadedModel, params: SamplingParams, generator, options: dict[str, Any]) -> Proposer:
    sizes = {key: options[key] for key in ("window", "ngram", "guesses") if options.get(key) is not None}
    max_context = getattr(target.model.config, "max_position_embeddings", None)
    return LookaheadProposer(**sizes, max_context=max_context)


METHODS: dict[str, Factory] = {
    "ar": _ar,
    "pld": _pld,
    "draft": _draft,
    "lookahead": _lookahead,
    "redrafter": _redrafter,
}


def load_draft(target: LoadedModel, spec: str) -> LoadedModel:
    """Load a draft model and refuse it if its vocabulary differs from the target's."""
    draft = load_model(spec)
    check_same_vocabulary(target.model, draft.model, target.tokenizer, draft.tokenizer)
    return draft


def build_proposer(method: str, target: LoadedModel, params: SamplingParams,
                   generator: torch.Generator | None = None, **options: Any) -> Proposer:
    """Make the proposer for ``method``; options are the method's own (num_tokens, draft, window, ...)."""
    factory = METHODS.get(method)
    if factory is None:
        raise HastenError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return factory(target, params, generator, options)
