"""Batches, loss and validation of the draft trainer, for soft (top-K) and hard (next-token) labels alike.

Soft labels: cross-entropy against the target's top-K distribution restricted to the draft vocabulary, plus
``ce_weight`` times the hard cross-entropy on the target's top-1. Hard labels (token-only data): cross-entropy on
the next token, the target's own choice. The draft's head runs only at positions that carry loss.
"""

from __future__ import annotations

import random

import torch
from tqdm import tqdm
from transformers import PreTrainedModel

from hasten.training.token_data import Corpus


def length_batches(lengths: list[int], items: list[int], batch_tokens: int, seed: int | None = None
                   ) -> list[list[int]]:
    """Groups of items of similar length whose padded size stays under ``batch_tokens``, in a seeded order
    (sorted by length, ties broken at random when ``seed`` is given, groups shuffled)."""
    rng = random.Random(seed)
    keys = {i: rng.random() for i in items} if seed is not None else {}
    ordered = sorted(items, key=lambda i: (lengths[i], keys.get(i, 0.0)))
    groups: list[list[int]] = []
    current: list[int] = []
    for index in ordered:
        if current and (len(current) + 1) * lengths[index] > batch_tokens:
            groups.append(current)
            current = []
        current.append(index)
    if current:
        groups.append(current)
    if seed is not None:
        rng.shuffle(groups)
    return groups


def collate(corpus: Corpus, group: list[int], remap: torch.Tensor, prompt_weight: float) -> dict[str, torch.Tensor]:
    """Padded tensors of a batch; ``remap`` maps full-vocabulary ids to draft rows (-1 when absent).

    ``top_rows`` (B, W, K) holds the label rows: the target's top-K (soft) or the next token alone (hard, in
    column 0); ``top_probs`` their probabilities (1 for a hard label); ``soft`` (B, W) says which positions have
    soft labels (a batch may mix both, from a corpus of several sources). ``weight`` is 0 where nothing is
    learnt."""
    examples = [corpus.example(i) for i in group]
    width = max(len(e["tokens"]) for e in examples)
    k = max((e["topk_ids"].shape[1] for e in examples if "topk_ids" in e), default=1)
    out = {
        "ids": torch.zeros(len(examples), width, dtype=torch.long),
        "attention": torch.zeros(len(examples), width, dtype=torch.long),
        "weight": torch.zeros(len(examples), width),
        "top_rows": torch.full((len(examples), width, k), -1, dtype=torch.long),
        "top_probs": torch.zeros(len(examples), width, k),
        "soft": torch.zeros(len(examples), width, dtype=torch.bool),
    }
    for row, (item, e) in enumerate(zip(group, examples, strict=True)):
        n = len(e["tokens"])
        out["ids"][row, :n] = e["tokens"]
        out["attention"][row, :n] = 1
        weight = torch.where(e["loss_mask"], 1.0, prompt_weight) * corpus.weights[item]
        if "topk_ids" in e:
            kept = e["topk_ids"].shape[1]
            out["top_rows"][row, :n, :kept] = remap[e["topk_ids"]]
            out["top_probs"][row, :n, :kept] = e["topk_logprobs"].float().exp()
            out["soft"][row, :n] = True
        else:
            out["top_rows"][row, : n - 1, 0] = remap[e["tokens"][1:]]
            out["top_probs"][row, : n - 1, 0] = 1.0
            weight[n - 1] = 0.0  # the last token has no next token
        out["weight"][row, :n] = weight
    return out


def batch_loss(draft: PreTrainedModel, batch: dict[str, torch.Tensor], ce_weight: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weighted loss, top-1 agreement, weight) at the positions of ``batch`` that carry weight (flattened)."""
    hidden = draft.model(input_ids=batch["ids"], attention_mask=batch["attention"]).last_hidden_state
    keep = batch["weight"] > 0
    logq = torch.log_softmax(draft.lm_head(hidden[keep]).float(), dim=-1)
    rows, weight = batch["top_rows"][keep], batch["weight"][keep]
    present = rows >= 0
    picked = logq.gather(-1, rows.clamp_min(0)) * present
    per_position = -(batch["top_probs"][keep] * picked).sum(-1)
    per_position = per_position + ce_weight * -picked[..., 0] * batch["soft"][keep]  # soft labels: + hard top-1
    loss = (per_position * weight).sum() / max(len(weight), 1)  # weights scale a position's share, not the mean
    agree = (logq.argmax(-1) == rows[..., 0]).float()
    return loss, agree, weight


@torch.no_grad()
def evaluate(draft: PreTrainedModel, corpus: Corpus, items: list[int], remap: torch.Tensor, batch_tokens: int,
             ce_weight: float, progress: bool = False) -> tuple[float, float]:
    """(mean loss, top-1 agreement with the label) over the answer positions of ``items`` (unweighted).

    Top-1 agreement with the target's own choice is what greedy acceptance depends on."""
    if not items:
        return float("nan"), float("nan")
    was_training = draft.training
    draft.eval()
    hits = total = loss_sum = 0.0
    groups = length_batches(corpus.lengths, items, batch_tokens)
    for group in tqdm(groups, desc="validation", unit="batch", disable=not progress, leave=False):
        batch = collate(corpus, group, remap, 0.0)
        batch["weight"] = (batch["weight"] > 0).float()  # every answer position counts once
        loss, agree, weight = batch_loss(draft, batch, ce_weight)
        hits += float(agree.sum())
        total += float(weight.sum())
        loss_sum += float(loss) * float(weight.sum())
    draft.train(was_training)
    return loss_sum / max(total, 1.0), hits / max(total, 1.0)
