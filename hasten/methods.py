"""The method registry: a name on the command line becomes a proposer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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
    return PromptLookupProposer(**options)


def _draft(target: LoadedModel, params: SamplingParams, generator, options: dict[str, Any]) -> Proposer:
    draft = options.get("draft")
    if draft is None and target.name == "default":  # the draft distilled from the default model ships with hasten
        from hasten.draft_head import shipped_draft_proposer

        return shipped_draft_proposer(target, params, options.get("num_tokens"), generator)
    if draft is None:
        raise HastenError("--method draft needs a draft model (--draft-model PATH)")
    return DraftModelProposer(draft.backend, params, num_tokens=options.get("num_tokens", 6), generator=generator)


def _redrafter(target: LoadedModel, params: SamplingParams, generator, options: dict[str, Any]) -> Proposer:
    head = load_head(target.name, target.backend, options.get("head"))
    return ReDrafterProposer(head, options.get("beam_width", 2), options.get("beam_length", 5))


def _lookahead(target: LoadedModel, params: SamplingParams, generator, options: dict[str, Any]) -> Proposer:
    return LookaheadProposer(**options, max_context=target.max_context)


@dataclass(frozen=True)
class Method:
    """A drafting method: how to build its proposer and which options it takes."""

    factory: Factory
    options: frozenset[str] = frozenset()


METHODS: dict[str, Method] = {
    "ar": Method(_ar),
    "pld": Method(_pld, frozenset({"num_tokens", "max_ngram", "min_ngram", "branches"})),
    "draft": Method(_draft, frozenset({"num_tokens", "draft"})),
    "lookahead": Method(_lookahead, frozenset({"window", "ngram", "guesses"})),
    "redrafter": Method(_redrafter, frozenset({"beam_width", "beam_length", "head"})),
}


def load_draft(target: LoadedModel, spec: str, backend: str = "auto") -> LoadedModel:
    """Load a draft model and refuse it if its vocabulary differs from the target's."""
    draft = load_model(spec, backend)
    check_same_vocabulary(target.backend, draft.backend, target.tokenizer, draft.tokenizer)
    return draft


def check_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options that are set (not None), refusing any that ``method`` does not take and bad sizes."""
    given = {key: value for key, value in options.items() if value is not None}
    unknown = sorted(set(given) - METHODS[method].options)
    if unknown:
        accepted = ", ".join(sorted(METHODS[method].options)) or "none"
        raise HastenError(f"method {method!r} takes no option {unknown[0]!r} (its options: {accepted})")
    for key, value in given.items():
        if key in ("draft", "head"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise HastenError(f"{method} option --{key.replace('_', '-')} must be an integer >= 1, got {value!r}")
    return given


def options_for(method: str, pool: dict[str, Any]) -> dict[str, Any]:
    """The options of a shared pool (one bench or server configuration for many methods) that ``method`` takes."""
    spec = METHODS.get(method)
    return {key: value for key, value in pool.items() if spec is not None and key in spec.options}


def build_proposer(method: str, target: LoadedModel, params: SamplingParams,
                   generator: torch.Generator | None = None, **options: Any) -> Proposer:
    """Make the proposer for ``method``; options are the method's own (num_tokens, draft, window, ...)."""
    spec = METHODS.get(method)
    if spec is None:
        raise HastenError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return spec.factory(target, params, generator, check_options(method, options))
