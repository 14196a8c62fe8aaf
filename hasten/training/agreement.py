"""Teacher-forced top-1 agreement of a draft and a ReDrafter head with the target's greedy answers, by category.

Validation agreement (``val_top1``) is measured on held-out answers to the prompts the drafters were trained on;
this measures them on prompts like the bench's (``hasten train prompts``' held-out split): the target answers a
seeded sample greedily, then one pass of each drafter over prompt + answer gives its top-1 at every answer
position, as in training.

* Draft: at each answer position (the last prompt token predicts the first answer token, as ``val_top1`` counts),
  the draft's argmax over its reduced vocabulary, mapped back to a full id, against the answer's token.
* Head: at answer position t it gets the target's hidden state h_t and the tokens t+1 .. t+d, and guesses token
  t+d+1 (d = 1 .. depth), as ``hasten train redrafter`` teaches it. A token outside a drafter's vocabulary is a
  miss (it cannot be drafted), never a hit.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from hasten.api import generate_batch, prompt_ids
from hasten.models import LoadedModel
from hasten.redrafter.head import ReDrafterHead


@dataclass
class Counts:
    """Hits and positions of one drafter over some answers (per depth for a head)."""

    hits: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    outside: int = 0  # labels at depth 1 outside the drafter's vocabulary

    def add(self, hits: Sequence[int], positions: Sequence[int], outside: int) -> None:
        if not self.hits:
            self.hits, self.positions = [0] * len(hits), [0] * len(positions)
        self.hits = [a + b for a, b in zip(self.hits, hits, strict=True)]
        self.positions = [a + b for a, b in zip(self.positions, positions, strict=True)]
        self.outside += outside

    def report(self) -> dict[str, Any]:
        top1 = [round(h / p, 4) if p else None for h, p in zip(self.hits, self.positions, strict=True)]
        return {"top1": top1, "positions": self.positions,
                "outside_vocab": round(self.outside / self.positions[0], 4) if self.positions and self.positions[0]
                else None}


def sample_by_category(rows: Sequence[dict[str, Any]], per_category: int, seed: int = 0) -> list[dict[str, Any]]:
    """A seeded sample of up to ``per_category`` rows of each category, categories in sorted order."""
    by_category: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_category.setdefault(row["category"], []).append(row)
    rng = random.Random(seed)
    return [row for category in sorted(by_category)
            for row in rng.sample(by_category[category], min(per_category, len(by_category[category])))]


def greedy_answers(loaded: LoadedModel, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 8,
                   progress: bool = True) -> list[list[int]]:
    """The target's greedy answers (``ar``), ``batch_size`` prompts decoded together (one pass a step for all)."""
    answers: list[list[int]] = []
    bar = tqdm(total=len(prompts), desc="greedy answers", unit="prompt", disable=not progress)
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        results = generate_batch(loaded, chunk, "ar", max_new_tokens=max_new_tokens, temperature=0.0)
        answers.extend(result.token_ids for result in results)
        bar.update(len(chunk))
    bar.close()
    return answers


@torch.no_grad()
def draft_counts(draft: torch.nn.Module, vocab_ids: torch.Tensor, prompt: list[int], answer: list[int]
                 ) -> tuple[list[int], list[int], int]:
    """([hits], [positions], labels outside the vocabulary) of a reduced-vocabulary draft over one answer."""
    tokens = torch.tensor([prompt + answer])
    logits = draft(input_ids=tokens).logits[0, len(prompt) - 1 : -1]
    guess = vocab_ids[logits.argmax(-1)]
    labels = torch.tensor(answer)
    inside = torch.isin(labels, vocab_ids)
    return [int((guess == labels).sum())], [len(answer)], int((~inside).sum())


@torch.no_grad()
def head_counts(target: torch.nn.Module, head: ReDrafterHead, prompt: list[int], answer: list[int], depth: int = 4
                ) -> tuple[list[int], list[int], int]:
    """([hits per depth], [positions per depth], depth-1 labels outside the vocabulary) of a head over one answer.

    ``target`` is the transformers model (its last hidden states, after the final norm, are what the head reads)."""
    tokens = torch.tensor(prompt + answer)
    length, first = len(tokens), len(prompt) - 1
    if length - first < 3:  # no position has a depth-1 label
        return [0] * depth, [0] * depth, 0
    hidden = target.model(input_ids=tokens[None]).last_hidden_state[0].float()
    t = torch.arange(first, length - 2)  # positions whose depth-1 label (t + 2) exists
    state = head.init_state(len(t))
    hits, positions, outside = [], [], 0
    for d in range(1, depth + 1):
        valid = t + d + 1 <= length - 1
        state = head.step(state, tokens[(t + d).clamp_max(length - 1)])
        guess = head.draft_ids[head.logits(hidden[t], state).argmax(-1)]
        labels = tokens[(t + d + 1).clamp_max(length - 1)]
        hits.append(int(((guess == labels) & valid).sum()))
        positions.append(int(valid.sum()))
        if d == 1:
            outside = int((~torch.isin(labels[valid], head.draft_ids)).sum())
    return hits, positions, outside


def measure(target: LoadedModel, items: Sequence[dict[str, Any]], draft: torch.nn.Module | None = None,
            vocab_ids: torch.Tensor | None = None, head: ReDrafterHead | None = None, depth: int = 4,
            progress: bool = True) -> dict[str, Any]:
    """Agreement of ``draft`` and ``head`` (either may be None) over ``items`` (``category``, ``prompt``,
    ``answer_ids``); ``target`` is loaded through transformers. Returns the pooled and per-category reports."""
    totals: dict[str, dict[str, Counts]] = {}
    for item in tqdm(items, desc="teacher forcing", unit="answer", disable=not progress):
        ids = prompt_ids(target, item["prompt"])
        answer = list(item["answer_ids"])
        if not answer:
            continue
        for name in ("all", item["category"]):
            counts = totals.setdefault(name, {"draft": Counts(), "head": Counts()})
            if draft is not None and vocab_ids is not None:
                counts["draft"].add(*draft_counts(draft, vocab_ids, ids, answer))
            if head is not None:
                counts["head"].add(*head_counts(target.model, head, ids, answer, depth))
    report: dict[str, Any] = {}
    for name, counts in totals.items():
        report[name] = {drafter: c.report() for drafter, c in counts.items() if c.positions}
    return report
