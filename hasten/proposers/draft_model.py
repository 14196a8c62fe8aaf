"""Classic speculative decoding: a small draft model of the same vocabulary guesses K tokens."""

from __future__ import annotations

import time

import torch

from hasten.adaptive.chooser import DraftPolicy, Feature
from hasten.backends.base import ModelBackend
from hasten.errors import HastenError
from hasten.proposers.base import Proposal, Proposer, StepOutcome
from hasten.sampling import SamplingParams, sample
from hasten.tree import TokenTree


def check_same_vocabulary(target: ModelBackend, draft: ModelBackend, target_tok=None, draft_tok=None) -> None:
    """Refuse a draft whose vocabulary differs from the target's, before any work is done."""
    if target.vocab_size != draft.vocab_size:
        raise HastenError(
            f"draft vocabulary ({draft.vocab_size} tokens) differs from the target's ({target.vocab_size}); "
            "speculative decoding needs the same vocabulary"
        )
    if target_tok is not None and draft_tok is not None and target_tok.get_vocab() != draft_tok.get_vocab():
        raise HastenError("draft and target tokenizers map tokens to different ids; they must share a vocabulary")


class DraftModelProposer(Proposer):
    """Run the draft autoregressively for ``num_tokens`` steps on its own KV cache, rolled back on rejection.

    Greedy decoding drafts the draft's argmax; sampling draws from the draft's distribution processed with
    the same temperature/top-k/top-p and hands those distributions to the verifier (min(1, q/p) rule).
    """

    name = "draft"

    def __init__(self, draft_model: ModelBackend, params: SamplingParams, num_tokens: int = 6,
                 generator: torch.Generator | None = None, policy: DraftPolicy | None = None) -> None:
        if num_tokens < 1:
            raise ValueError("draft needs num_tokens >= 1")
        self.draft = draft_model.new_target()
        self.params = params
        self.num_tokens = num_tokens
        self.generator = generator or params.generator()
        self.policy = policy
        # Running estimate (EMA) of one draft forward: it prices each further token of the chain. Whether the
        # draft runs at all is a ``CostlySource`` of the proposer that composes it (auto), not of this one.
        self.draft_ms = 0.0
        self._drafted = 0
        self._chain: list[int] = []  # the tokens drafted this step
        self._offered: tuple[TokenTree, list[list[Feature]]] | None = None  # the tree and features verified

    def start(self, context: list[int], hidden: torch.Tensor | None) -> None:
        self.draft.start(context[:-1])
        self._drafted, self._chain = 0, []

    def propose(self, context: list[int], max_depth: int) -> Proposal:
        self._offered = None
        tokens, rows, features = self.draft_chain(context, min(self.num_tokens, max_depth), self.params.greedy)
        tree = TokenTree.chain(tokens, torch.stack(rows) if rows else None)
        if self.policy is not None:
            tree, features = self.policy.choose(tree, features)
            self._offered = (tree, features)
        return Proposal(tree)

    def draft_chain(self, context: list[int], k: int, greedy: bool
                    ) -> tuple[list[int], list[torch.Tensor], list[list[Feature]]]:
        """Up to ``k`` draft tokens after ``context`` (fewer where the policy says one more will not pay):
        the tokens, their draft distributions (sampling only) and one feature per token for the policy."""
        k = min(k, self.draft.max_context - len(context))
        self._drafted = 0
        self._chain = []
        if k <= 0:  # nothing to draft, or the draft's own context is full: this step is plain decoding
            return [], [], []
        feed = context[self.draft.cache_len :]
        tokens: list[int] = []
        rows: list[torch.Tensor] = []
        features: list[list[Feature]] = []
        path_prob = 1.0
        gained = spent = 0.0
        for depth in range(1, k + 1):
            if self.policy is not None and not self._worth_drafting(depth, path_prob, gained, spent):
                break
            began = time.perf_counter()
            chain = list(range(-1, len(feed) - 1))
            logits = self.vocab_logits(self.draft.score(feed, chain, [len(feed) - 1]).logits[-1])
            self.draft.commit(list(range(len(feed))))
            if greedy:
                token = int(logits.argmax())
                confidence = float(torch.softmax(logits.float(), -1)[token]) if self.policy is not None else 0.0
            else:
                probs = self.params.probs(logits)
                token = sample(probs, self.generator)
                rows.append(probs)
                confidence = float(probs[token])
            spent += (time.perf_counter() - began) * 1000
            tokens.append(token)
            feed = [token]
            self._drafted = depth
            if self.policy is not None:
                feature = ("draft", depth, min(int(confidence * 10), 9))
                features.append([feature])
                path_prob *= self.policy.acceptance.estimate(feature)
                gained += path_prob
        if self._drafted:
            self.draft_ms += (spent / self._drafted - self.draft_ms) * (0.2 if self.draft_ms else 1.0)
        self._chain = tokens
        return tokens, rows, features

    def _worth_drafting(self, depth: int, path_prob: float, gained: float, spent: float) -> bool:
        """Whether one more draft token (its acceptance guessed from its depth alone) is expected to pay."""
        assert self.policy is not None
        cost, others = self.policy.pass_cost, 1 + gained + self.policy.batch_gain
        chance = path_prob * self.policy.acceptance.estimate(("draft", depth))
        now = others / (cost(depth) + spent)
        after = (others + chance) / (cost(depth + 1) + spent + self.draft_ms)
        return after > now

    def vocab_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The draft's logits over the target's vocabulary (a hook for drafts with a reduced output vocabulary)."""
        return logits

    def update(self, outcome: StepOutcome) -> None:
        if self.policy is not None and self._offered is not None:
            self.policy.learn(*self._offered, outcome)
        self.rollback(outcome.accepted)

    def rollback(self, accepted: list[int]) -> None:
        """Keep the draft's cache for the drafted tokens the target accepted (a prefix of the chain; another
        drafter's accepted tokens match it only as far as they agree)."""
        # The draft cache holds the context plus all drafted tokens but the last.
        agreed = 0
        while agreed < min(len(accepted), len(self._chain)) and accepted[agreed] == self._chain[agreed]:
            agreed += 1
        stale = (self._drafted - 1) - min(agreed, self._drafted - 1)
        if stale > 0:
            self.draft.truncate(self.draft.cache_len - stale)
        self._drafted, self._chain = 0, []
