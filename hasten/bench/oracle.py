"""The oracle bound: what a perfect draft-length policy over a method's own candidates would reach.

A replay along a greedy ``ar`` output, after the prefill's token (the first new token comes from the prefill, not
from a decode step): at each step the method's candidates are taken from the context so far;
the oracle drafts exactly the accepted prefix ``L`` of the best candidate (0 if none accepts anything), so the
step emits ``L + 1`` tokens and costs ``cost(L + 1)`` on the target's measured cost curve, at its cache length. The
bound is the speedup over ``ar`` under that curve: ``ar``'s passes' cost over the oracle's. Prefill and drafting
time are not counted, so it is an upper bound on what the method's candidates can earn, not a prediction.

Sources: ``pld`` (lookup matches), ``lookahead`` (its n-gram pool from the context), ``llamacpp_pld`` (its one
candidate), ``draft`` (the paths of the draft model's greedy tree, full depth, widest sizes) and ``auto`` (lookup, the
pool where lookup finds nothing, and the draft tree's paths where auto has a draft; not ReDrafter beams, which need
the target's hidden states).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from hasten.errors import HastenError
from hasten.methods import build_proposer
from hasten.models import LoadedModel
from hasten.proposers.auto import POOL_GUESSES, POOL_NGRAM, AutoProposer
from hasten.proposers.draft_model import DraftModelProposer
from hasten.proposers.lookahead import DEFAULT_NGRAM, LookaheadProposer, NgramPool
from hasten.proposers.prompt_lookup import PromptLookupProposer
from hasten.sampling import SamplingParams

Cost = Callable[[int, int], float]  # milliseconds of a pass over (width) tokens after (cached) tokens


class CandidateSource(Protocol):
    """A method's candidates as a function of the context (and whatever it has seen before)."""

    def start(self, context: list[int]) -> None:
        """A new sequence: ``context`` is the prompt and the prefill's token."""
        ...

    def candidates(self, context: list[int], depth: int) -> list[list[int]]:
        """Continuations the method could draft after ``context``, each at most ``depth`` tokens."""
        ...

    def advance(self, context: list[int], new: list[int]) -> None:
        """``new`` tokens were appended to ``context`` (already extended)."""
        ...


class PldSource:
    """hasten's ``pld`` candidates: the adaptive defaults (8 tokens, 1- to 4-token matches, 3 branches)."""

    def __init__(self, num_tokens: int = 8, max_ngram: int = 4, min_ngram: int = 1, branches: int = 3) -> None:
        self.num_tokens = num_tokens
        self.proposer = PromptLookupProposer(num_tokens=num_tokens, max_ngram=max_ngram, min_ngram=min_ngram,
                                             branches=branches)

    @classmethod
    def like(cls, lookup: PromptLookupProposer) -> PldSource:
        """The candidates of ``lookup`` as it is configured."""
        return cls(lookup.num_tokens, lookup.max_ngram, lookup.min_ngram, lookup.branches)

    def start(self, context: list[int]) -> None:
        pass

    def candidates(self, context: list[int], depth: int) -> list[list[int]]:
        return self.proposer.matches(context, min(depth, self.num_tokens))[1]

    def advance(self, context: list[int], new: list[int]) -> None:
        pass


class LookaheadPoolSource:
    """Lookahead's n-gram pool filled from the context only (no Jacobi window): guesses start with the root."""

    def __init__(self, ngram: int = DEFAULT_NGRAM, guesses: int = 4) -> None:
        self.ngram = ngram
        self.guesses = guesses
        self.pool = NgramPool(ngram, guesses)

    def start(self, context: list[int]) -> None:
        self.pool = NgramPool(self.ngram, self.guesses)
        self.pool.add_sequence(context)

    def candidates(self, context: list[int], depth: int) -> list[list[int]]:
        return [tail[:depth] for tail in self.pool.lookup(context[-1], self.guesses)]

    def advance(self, context: list[int], new: list[int]) -> None:
        # The n-grams that end in the new tokens, as the proposer pools them after each step.
        self.pool.add_sequence(context[-(len(new) + self.ngram - 1):])


class LlamaCppPldSource:
    """llama-cpp-python's ``LlamaPromptLookupDecoding`` candidate: one continuation of the first match."""

    def __init__(self, max_ngram: int = 2, num_pred_tokens: int = 10) -> None:
        self.max_ngram = max_ngram
        self.num_pred_tokens = num_pred_tokens

    def start(self, context: list[int]) -> None:
        pass

    def candidates(self, context: list[int], depth: int) -> list[list[int]]:
        import numpy as np
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        found = LlamaPromptLookupDecoding.find_candidate_pred_tokens(
            np.asarray(context, dtype=np.intc), self.max_ngram, self.num_pred_tokens)
        return [found.tolist()[:depth]] if len(found) else []

    def advance(self, context: list[int], new: list[int]) -> None:
        pass


class DraftSource:
    """A draft model's greedy tree after the context, every root-to-leaf path a candidate, at full depth and the
    method's widest sizes (the policy is dropped: the oracle picks what to keep), on the proposer's own cache, which
    keeps only the context, as in the engine."""

    def __init__(self, proposer: DraftModelProposer, num_tokens: int | None = None) -> None:
        proposer.children, proposer.frontier = proposer.sizes(greedy=True)  # the policy's upper bounds
        proposer.policy = None
        self.proposer = proposer
        self.num_tokens = num_tokens or proposer.num_tokens

    def start(self, context: list[int]) -> None:
        self.proposer.start(context, None)

    def candidates(self, context: list[int], depth: int) -> list[list[int]]:
        return self.proposer.draft_tree(context, min(depth, self.num_tokens), greedy=True).paths()[0]

    def advance(self, context: list[int], new: list[int]) -> None:
        # The accepted drafted tokens, as the engine passes them (``new`` less the target's bonus token); the next
        # tree feeds the draft what its cache lacks, from ``cache_len`` on.
        self.proposer.rollback(new[:-1])


class AutoSource:
    """``auto``'s candidates: prompt lookup, the n-gram pool only where lookup finds nothing, and the draft tree's
    paths where auto has a draft. ReDrafter beams are left out (they need the target's hidden states): where auto runs
    the head, its measured tokens per pass can exceed this bound."""

    def __init__(self, num_tokens: int = 8, lookup: PldSource | None = None, draft: DraftModelProposer | None = None
                 ) -> None:
        self.num_tokens = num_tokens
        self.lookup = lookup or PldSource(num_tokens)
        self.pool = LookaheadPoolSource(POOL_NGRAM, POOL_GUESSES)
        self.draft = DraftSource(draft, num_tokens) if draft is not None else None

    def _sources(self) -> list[CandidateSource]:
        return [self.lookup, self.pool] + ([self.draft] if self.draft is not None else [])

    def start(self, context: list[int]) -> None:
        for source in self._sources():
            source.start(context)

    def candidates(self, context: list[int], depth: int) -> list[list[int]]:
        depth = min(depth, self.num_tokens)
        found = self.lookup.candidates(context, depth) or self.pool.candidates(context, depth)
        return found + (self.draft.candidates(context, depth) if self.draft is not None else [])

    def advance(self, context: list[int], new: list[int]) -> None:
        for source in self._sources():
            source.advance(context, new)


def source_for(method: str, loaded: LoadedModel, params: SamplingParams,
               options: dict[str, Any] | None = None) -> CandidateSource | None:
    """The candidates of ``method`` as it is configured on ``loaded`` (None for a method without a replay)."""
    if method == "llamacpp_pld":
        from hasten.bench.anchors import LLAMACPP_PLD_TOKENS

        return LlamaCppPldSource(num_pred_tokens=LLAMACPP_PLD_TOKENS)
    if method not in ("pld", "lookahead", "draft", "auto"):
        return None
    try:
        proposer = build_proposer(method, loaded, params, None, **(options or {}))
    except HastenError:
        return None
    if isinstance(proposer, PromptLookupProposer):
        return PldSource.like(proposer)
    if isinstance(proposer, LookaheadProposer):
        return LookaheadPoolSource(proposer.ngram, proposer.guesses)
    if isinstance(proposer, DraftModelProposer):  # the reduced-vocabulary draft too
        return DraftSource(proposer)
    if isinstance(proposer, AutoProposer):
        return AutoSource(proposer.num_tokens, PldSource.like(proposer.lookup), proposer.draft)
    return None


@dataclass
class OracleRun:
    """One replay (or several added up): tokens emitted, steps taken, and their cost against ``ar``'s."""

    tokens: int = 0
    steps: int = 0
    oracle_ms: float = 0.0
    ar_ms: float = 0.0

    def __add__(self, other: OracleRun) -> OracleRun:
        return OracleRun(self.tokens + other.tokens, self.steps + other.steps, self.oracle_ms + other.oracle_ms,
                         self.ar_ms + other.ar_ms)

    @property
    def speedup(self) -> float | None:
        """The bound: ``ar``'s cost over the oracle's (None for an empty output)."""
        return self.ar_ms / self.oracle_ms if self.oracle_ms > 0 else None

    @property
    def mean_accepted(self) -> float | None:
        """Tokens per pass under the oracle policy."""
        return self.tokens / self.steps if self.steps else None


def accepted_prefix(candidate: Sequence[int], truth: Sequence[int]) -> int:
    """How many leading tokens of ``candidate`` equal ``truth``'s."""
    n = 0
    for drafted, actual in zip(candidate, truth, strict=False):
        if drafted != actual:
            break
        n += 1
    return n


def replay(prompt: Sequence[int], output: Sequence[int], source: CandidateSource, cost: Cost) -> OracleRun:
    """Walk ``output`` (greedy ``ar`` tokens after ``prompt``) step by step under the oracle draft length.

    As in the engine, the prefill gives the first token and drafting starts after it (``Generation.prefill``): the
    walk starts from ``prompt + output[:1]``, and that token is left out of both costs and of the tokens. A step
    with ``r`` tokens still to come drafts at most ``r - 1`` (the target adds one). Each pass, ``ar``'s and the
    oracle's, is priced after the tokens cached before it (the context less its last token), as the engine does.
    """
    if not output:
        return OracleRun()
    context = [*prompt, output[0]]
    source.start(context)
    produced = 1
    run = OracleRun(tokens=len(output) - produced,
                    ar_ms=sum(cost(1, len(prompt) + i) for i in range(len(output) - produced)))
    while produced < len(output):
        depth = len(output) - produced - 1
        best = 0
        if depth > 0:
            truth = output[produced : produced + depth]
            best = max((accepted_prefix(c, truth) for c in source.candidates(context, depth)), default=0)
        new = list(output[produced : produced + best + 1])
        run.steps += 1
        run.oracle_ms += cost(best + 1, len(context) - 1)
        context.extend(new)
        source.advance(context, new)
        produced += len(new)
    return run
