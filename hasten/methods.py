"""The method registry: a name on the command line becomes a proposer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from hasten.adaptive import DraftPolicy, draft_policy
from hasten.adaptive.sizing import BeamSizes, free_width, lookahead_sizes, redrafter_sizes
from hasten.errors import HastenError
from hasten.models import LoadedModel, choose_backend, load_model, resolve
from hasten.proposers.auto import AutoProposer
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


def _policy(target: LoadedModel, source: str, params: SamplingParams, options: dict[str, Any]) -> DraftPolicy | None:
    """The adaptive policy of a method (the default), or None with ``adaptive=False`` (fixed sizes)."""
    if not options.pop("adaptive", True):
        return None
    return draft_policy(target, source, params.greedy)


def _pld(target: LoadedModel, params: SamplingParams, generator, options: dict[str, Any]) -> Proposer:
    policy = _policy(target, "pld", params, options)
    if policy is not None:  # generous candidates: the policy prunes them to what pays
        options = {"num_tokens": 8, "max_ngram": 4, "min_ngram": 1, "branches": 3, **options}
    return PromptLookupProposer(**options, policy=policy)


def _draft(target: LoadedModel, params: SamplingParams, generator, options: dict[str, Any]) -> DraftModelProposer:
    draft = options.get("draft")
    if draft is None and target.name != "default":
        raise HastenError(f"no draft model ships for {target.name!r}: --method draft needs a draft model "
                          "(--draft-model PATH, same vocabulary)")
    policy = _policy(target, "draft", params, options)
    num_tokens = options.get("num_tokens") or (8 if policy is not None else None)
    if draft is None:  # the draft distilled from the default model ships with hasten
        from hasten.proposers.reduced_draft import shipped_draft_proposer

        return shipped_draft_proposer(target.backend, params, num_tokens, generator, policy)
    return DraftModelProposer(draft.backend, params, num_tokens=num_tokens or 6, generator=generator, policy=policy)


def _redrafter(target: LoadedModel, params: SamplingParams, generator, options: dict[str, Any]) -> Proposer:
    if options.get("head") is None and target.name != "default":
        raise HastenError(f"no ReDrafter head ships for {target.name!r}: --method redrafter needs a head "
                          "(--head DIR; train one with 'hasten train redrafter')")
    head = load_head(target.name, target.backend, options.get("head"))
    policy = _policy(target, "redrafter", params, options)
    # adaptive: as wide as the cost curve makes nearly free (the policy prunes the beams' tree); fixed: 2 x 5
    sizes = redrafter_sizes(free_width(policy.pass_cost)) if policy is not None else BeamSizes(2, 5)
    return ReDrafterProposer(head, options.get("beam_width", sizes.beam_width),
                             options.get("beam_length", sizes.beam_length), policy)


def _lookahead(target: LoadedModel, params: SamplingParams, generator, options: dict[str, Any]) -> Proposer:
    policy = _policy(target, "lookahead", params, options)
    if policy is not None:  # a window as wide as the cost curve makes nearly free; options given win
        options = {**lookahead_sizes(free_width(policy.pass_cost))._asdict(), **options}
    return LookaheadProposer(**options, max_context=target.max_context, policy=policy)


def _wide_passes_are_cheap(policy: DraftPolicy, width: int = 8) -> bool:
    """Whether a beam tree can pay here: a pass over ``width`` tokens costs under twice a one-token pass.

    The shipped head's beams are accepted rarely enough that on a compute-bound CPU (llama.cpp, 2 cores: 8 tokens
    cost 3x one) they never paid in the benchmark, while asking the target for hidden states costs every pass
    (llama.cpp outputs every row then); on transformers or a GPU, where wide passes are nearly free, they do pay.
    """
    return policy.cost(width) < 2 * policy.cost(1)


def _draft_can_pay(policy: DraftPolicy, agreement: float, depth: int = 8) -> bool:
    """Whether a draft the target agrees with at rate ``agreement`` can pay here at any depth: a chain of k drafted
    tokens earns 1 + a + ... + a^k tokens for a pass over k + 1, against one token for a one-token pass.

    Every depth counts, not only the second token's: transformers fp32 on a CPU blocks rows by four (5 tokens cost
    1.49x one, 2 tokens 1.72x), where a 0.60 draft pays at depth 4 and not at depth 1. On llama.cpp on the 2-core
    EPYC (2 tokens 1.62x one, 5 tokens 3.19x) no depth pays, and its retries cost auto the draft's prefill.
    """
    one = policy.cost(1)
    return any(sum(agreement ** i for i in range(k + 1)) * one > policy.cost(k + 1) for k in range(1, depth + 1))


def _auto(target: LoadedModel, params: SamplingParams, generator, options: dict[str, Any]) -> Proposer:
    from hasten.draft.model import bench_like_agreement, validation_agreement

    policy = draft_policy(target, "auto", params.greedy)
    head = options.get("head")
    if head is not None or (target.name == "default" and _wide_passes_are_cheap(policy)):
        head = load_head(target.name, target.backend, head)  # the one given, or the shipped one
    draft: DraftModelProposer | None = None
    # the shipped draft's agreement on held-out prompts like the bench's (0.32), not on its validation split (0.60)
    agreement = bench_like_agreement()
    agreement = validation_agreement() if agreement is None else agreement
    shipped_pays = target.name == "default" and _draft_can_pay(policy, agreement)
    if options.get("draft") is not None or shipped_pays:  # the one given, or the shipped draft where it can pay
        draft = _draft(target, params, generator, {"draft": options.get("draft"), "num_tokens": 8})
        draft.policy = policy  # its depth follows auto's policy; auto learns from its tokens
    return AutoProposer(policy, head, options.get("num_tokens", 8), draft)


@dataclass(frozen=True)
class Method:
    """A drafting method: how to build its proposer and which options it takes."""

    factory: Factory
    options: frozenset[str] = frozenset()


METHODS: dict[str, Method] = {
    "ar": Method(_ar),
    "pld": Method(_pld, frozenset({"num_tokens", "max_ngram", "min_ngram", "branches", "adaptive"})),
    "draft": Method(_draft, frozenset({"num_tokens", "draft", "adaptive"})),
    "lookahead": Method(_lookahead, frozenset({"window", "ngram", "guesses", "adaptive"})),
    "redrafter": Method(_redrafter, frozenset({"beam_width", "beam_length", "head", "adaptive"})),
    "auto": Method(_auto, frozenset({"num_tokens", "head", "draft"})),
}


def load_draft(target: LoadedModel, spec: str, backend: str = "auto") -> LoadedModel:
    """Load a draft model on the target's device and dtype; refuse it if its vocabulary differs from the target's."""
    chosen = choose_backend(backend, resolve(spec)[1], target.device)
    dtype = target.dtype if chosen == "transformers" else "auto"
    draft = load_model(spec, chosen, device=target.device, dtype=dtype)
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
        if key == "adaptive":
            if not isinstance(value, bool):
                raise HastenError(f"{method} option adaptive must be true or false, got {value!r}")
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
