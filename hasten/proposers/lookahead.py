"""Lookahead decoding (``lookahead``): a Jacobi window collects n-grams that later become guesses.

Fu et al., "Break the Sequential Dependency of LLM Inference Using Lookahead Decoding" (arXiv 2402.02057).
Every target pass scores, besides the root and the verification tree, a 2-D *window* of ``window`` (W)
columns and ``ngram - 1`` levels. Column ``c`` is a trajectory of tokens at consecutive positions: its
level ``l`` sits at offset ``c + 1 + l`` after the root and sees the root, the first-level tokens of
columns ``0..c`` and its own column's lower levels (a chain of consecutive positions), never the tree.
The target's argmax at the top of a column extends it by one token, and the column plus that token is
an n-gram for the pool. Guesses are the pool's n-grams that start with the root (the last token).
Correctness never depends on the window: the verifier accepts only what the target itself would emit.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Sequence
from functools import cache

import torch

from hasten.adaptive.chooser import DraftPolicy, Feature
from hasten.adaptive.costly import CostlySource
from hasten.errors import HastenError
from hasten.proposers.base import (
    ExtraBranch,
    Proposal,
    Proposer,
    StepOutcome,
    accepted_if_drafted,
    last_accepted_capped,
)
from hasten.tree import TokenTree, merge_paths

# The window scores W * (N - 1) = 8 tokens and the guesses at most G * (N - 1) = 8 (fewer once merged).
DEFAULT_WINDOW = 2
DEFAULT_NGRAM = 5
DEFAULT_GUESSES = 2


class NgramPool:
    """N-grams keyed by their first token; each key keeps at most ``per_key`` tails, least recently used out."""

    def __init__(self, n: int, per_key: int) -> None:
        self.n = n
        self.per_key = per_key
        self._table: dict[int, OrderedDict[tuple[int, ...], str]] = {}

    def __len__(self) -> int:
        return sum(len(tails) for tails in self._table.values())

    def add(self, ngram: Sequence[int], origin: str = "context") -> None:
        """Insert (or refresh) one n-gram of exactly ``n`` tokens; ``origin`` says where it came from."""
        tails = self._table.setdefault(ngram[0], OrderedDict())
        tail = tuple(ngram[1:])
        if tail in tails:
            tails.move_to_end(tail)
            return
        tails[tail] = origin
        if len(tails) > self.per_key:
            tails.popitem(last=False)

    def add_sequence(self, tokens: Sequence[int]) -> None:
        """Insert every n-gram of a token sequence, left to right (so the latest ends up most recent)."""
        for start in range(len(tokens) - self.n + 1):
            self.add(tokens[start : start + self.n])

    def lookup(self, key: int, limit: int) -> list[list[int]]:
        """Up to ``limit`` tails (n - 1 tokens) stored under ``key``, most recently used first."""
        return [tail for tail, _ in self.lookup_with_origin(key, limit)]

    def lookup_with_origin(self, key: int, limit: int) -> list[tuple[list[int], str]]:
        """Like ``lookup``, each tail with the origin it was first added with."""
        tails = self._table.get(key)
        if not tails:
            return []
        return [(list(tail), origin) for tail, origin in reversed(tails.items())][:limit]


@cache
def window_parents(width: int, height: int) -> tuple[int, ...]:
    """Parents (``ROOT`` = -1) of a W x H window laid out level by level, as a tree below the root.

    Token ``l * width + c`` (level ``l``, column ``c``): level 0 is a chain through the columns
    (parent of column c is column c - 1, of column 0 the root), and each higher level's parent is the
    level below in its own column. So the token sits at depth ``c + 1 + l`` and attends to the root,
    level-0 tokens of columns ``0..c`` and levels ``1..l`` of its own column.
    """
    parents = []
    for level in range(height):
        for col in range(width):
            if level == 0:
                parents.append(col - 1)
            else:
                parents.append((level - 1) * width + col)
    return tuple(parents)


class LookaheadProposer(Proposer):
    """Lookahead decoding with a W x (N - 1) Jacobi window, an LRU n-gram pool and up to G guesses per step.

    Statistics after a generation: ``steps``, ``guess_steps`` (steps that verified at least one guess),
    ``hit_steps`` (steps that accepted at least one guessed token), ``accepted`` (guessed tokens accepted),
    and the rates ``guess_rate`` and ``hit_rate`` (per step).
    """

    name = "lookahead"

    def __init__(self, window: int = DEFAULT_WINDOW, ngram: int = DEFAULT_NGRAM, guesses: int = DEFAULT_GUESSES,
                 max_context: int | None = None, seed: int = 0, policy: DraftPolicy | None = None) -> None:
        for label, value, low in (("window", window, 1), ("ngram", ngram, 2), ("guesses", guesses, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise HastenError(f"lookahead {label} must be an integer >= {low}, got {value!r}")
        self.window = window
        self.ngram = ngram
        self.guesses = guesses
        self.max_context = max_context
        self.seed = seed
        self.policy = policy
        self._reference: list[int] = []  # the expected answer (``expect``): n-grams for the pool
        self.start([0], None)

    @property
    def hit_rate(self) -> float:
        return self.hit_steps / self.steps if self.steps else 0.0

    @property
    def guess_rate(self) -> float:
        return self.guess_steps / self.steps if self.steps else 0.0

    def stats(self) -> dict[str, float]:
        stats = {"pool_hit_rate": self.hit_rate, "guess_rate": self.guess_rate, "pool_ngrams": float(len(self.pool)),
                 "window_rate": self.window_steps / self.steps if self.steps else 0.0}
        return stats | super().stats()

    def expect(self, tokens: list[int]) -> None:
        self._reference = list(tokens)

    def start(self, context: list[int], hidden: torch.Tensor | None) -> None:
        self._rng = random.Random(self.seed)
        self._history = list(context)
        self.pool = NgramPool(self.ngram, self.guesses)
        self.pool.add_sequence(self._reference)
        self.pool.add_sequence(context)
        self.columns = [self._seed_column() for _ in range(self.window)]
        self._sent_window = False
        self._guessed = False
        self._offered: tuple[TokenTree, list[list[Feature]], list[bool]] | None = None  # + each node's origin
        # the window costs pass width; pooled guesses pay it back, steps later (so judged on the shared record)
        self.window_source = CostlySource("window", judged_locally=False)
        self._last_accepted: int | None = None
        self.steps = self.guess_steps = self.hit_steps = self.accepted = self.window_steps = 0

    def _seed_column(self) -> list[int]:
        """A fresh trajectory: ``ngram - 1`` consecutive tokens copied from a random place in the context."""
        height = self.ngram - 1
        history = self._history
        if len(history) < height:
            return [self._rng.choice(history) for _ in range(height)]
        start = self._rng.randrange(len(history) - height + 1)
        return history[start : start + height]

    def propose(self, context: list[int], max_depth: int) -> Proposal:
        self._offered = None
        if max_depth <= 0:
            self._sent_window = self._guessed = False
            return Proposal(TokenTree())
        found = [(tail[:max_depth], origin) for tail, origin in self.pool.lookup_with_origin(context[-1], self.guesses)]
        paths = [path for path, _ in found]
        if self.policy is None:
            tree = TokenTree.from_paths(paths)
            self._sent_window = self._window_fits(len(context), len(tree))
        else:
            last = last_accepted_capped(self._last_accepted)
            features = [[("pool", d, rank, origin == "window", last) for d in range(1, len(path) + 1)]
                        for rank, (path, origin) in enumerate(found)]
            tree, node_features = merge_paths(paths, features)
            tree, node_features = self.policy.choose(tree, node_features)
            origins = [any(f[3] for f in node) for node in node_features]
            self._offered = (tree, node_features, origins)
            # A step's window can earn at most one guess's N - 1 tokens: where its width costs more, it never runs.
            self._sent_window = self._window_fits(len(context), len(tree)) and self.window_source.should_run(
                self.policy, self._window_ms(len(tree)), ceiling=self.ngram - 1)
        self._guessed = len(tree) > 0
        self.window_steps += self._sent_window
        return Proposal(tree, self._branch() if self._sent_window else None)

    def _window_ms(self, tree_size: int) -> float:
        """What the window adds to this pass's predicted time, beside a tree of ``tree_size`` nodes."""
        assert self.policy is not None
        cost, width = self.policy.pass_cost, tree_size + 1
        return cost(width + self.window * (self.ngram - 1)) - cost(width)

    def _window_fits(self, context_len: int, tree_size: int) -> bool:
        """Whether the pass has a cache slot for every token: the root's is ``context_len - 1``, and the tree's
        and the window's follow it, one each however shallow they sit."""
        width = 1 + tree_size + self.window * (self.ngram - 1)
        return self.max_context is None or context_len - 1 + width <= self.max_context

    def _branch(self) -> ExtraBranch:
        height = self.ngram - 1
        tokens = [column[level] for level in range(height) for column in self.columns]
        top = (height - 1) * self.window
        return ExtraBranch(TokenTree(tokens, list(window_parents(self.window, height))),
                           list(range(top, top + self.window)))

    def update(self, outcome: StepOutcome) -> None:
        if self.policy is not None and self._offered is not None:
            tree, features, origins = self._offered
            self.policy.learn(tree, features, outcome)
            if self._sent_window:  # credit the window with the accepted tokens of n-grams it found
                self.window_source.credit(self.policy, sum(origins[node] for node in outcome.accepted_nodes))
            self._last_accepted = accepted_if_drafted(tree, outcome)
        new = [*outcome.accepted, outcome.next_token]
        self.steps += 1
        self.guess_steps += self._guessed
        self.hit_steps += bool(outcome.accepted)
        self.accepted += len(outcome.accepted)
        tail = self._history[-(self.ngram - 1) :] if self.ngram > 1 else []
        self._history.extend(new)
        self.pool.add_sequence(tail + new)
        if self._sent_window and outcome.extra_logits is not None:
            self._advance(outcome.extra_logits, shift=len(outcome.accepted))

    def _advance(self, logits: torch.Tensor, shift: int) -> None:
        """One Jacobi step: extend every column by the target's argmax at its top, pool the n-grams, then
        slide the window with the context (``shift`` extra tokens) and refill the columns that fell off."""
        predicted = logits.argmax(-1).tolist()  # the window's top level, one row per column
        grown = [column + [token] for column, token in zip(self.columns, predicted, strict=True)]
        for ngram in grown:
            self.pool.add(ngram, "window")
        # A column's tokens sit at offsets c+1.. ; after the context advances by shift + 1 tokens, the
        # grown column without its first token sits exactly where column c - shift starts.
        kept = [column[1:] for column in grown[shift:]]
        self.columns = kept + [self._seed_column() for _ in range(self.window - len(kept))]
