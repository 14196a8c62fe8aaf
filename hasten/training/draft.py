"""``hasten train draft``: distil a small reduced-vocabulary draft (``hasten.draft_head``) from self-distillation data.

Loss: soft cross-entropy against the target's top-K next-token distribution (restricted to the draft's
vocabulary), plus a little hard cross-entropy on the target's top-1 token, at response positions (prompt
positions get a small weight). Only the draft's layers and final norm are trained.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from hasten.draft_head import CONFIG, build_draft, load_draft_dir, save_draft, trainable_state
from hasten.errors import HastenError
from hasten.models import LoadedModel
from hasten.training.selfdistill import DEFAULT_OUT, DistillData, load_shards

OPTIMIZER = "optimizer.pt"


@dataclass
class TrainConfig:
    layers: list[int]
    draft_vocab: int = 8192
    epochs: int = 4
    lr: float = 5e-4
    batch_tokens: int = 4096
    prompt_weight: float = 0.1
    ce_weight: float = 0.2
    val_fraction: float = 0.05
    seed: int = 0


def choose_vocab(data: DistillData, size: int, full_vocab: int, always: set[int] | frozenset[int]) -> torch.Tensor:
    """The ``size`` tokens the target most often predicts (top-K probability mass over the data), sorted.

    ``always`` (end-of-sequence ids) is always in; ties and the remainder go to the lowest ids, which in BPE
    vocabularies are the earliest, most frequent merges.
    """
    size = min(size, full_vocab)
    mass = torch.zeros(full_vocab, dtype=torch.float64)
    mass.index_add_(0, data.topk_ids.flatten(), data.topk_logprobs.float().exp().flatten().double())
    mass.index_add_(0, data.tokens, torch.ones(len(data.tokens), dtype=torch.float64))
    mass -= torch.arange(full_vocab, dtype=torch.float64) * 1e-9  # ties: lower ids first
    for token in always:
        mass[token] = float("inf")
    return mass.topk(size).indices.sort().values


def split_sequences(data: DistillData, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    order = list(range(data.num_sequences))
    random.Random(seed).shuffle(order)
    held = max(1, round(len(order) * val_fraction)) if len(order) > 1 else 0
    return order[held:], order[:held]


def batches(data: DistillData, indices: list[int], batch_tokens: int) -> list[list[int]]:
    """Groups of sequences of similar length whose padded size stays under ``batch_tokens``."""
    lengths = (data.seq_starts[1:] - data.seq_starts[:-1]).tolist()
    ordered = sorted(indices, key=lambda i: lengths[i])
    groups, current = [], []
    for index in ordered:
        if current and (len(current) + 1) * lengths[index] > batch_tokens:
            groups.append(current)
            current = []
        current.append(index)
    if current:
        groups.append(current)
    return groups


def collate(data: DistillData, group: list[int], remap: torch.Tensor, prompt_weight: float) -> dict[str, torch.Tensor]:
    """Padded tensors of a batch; ``remap`` maps full-vocabulary ids to draft rows (-1 when absent)."""
    seqs = [data.sequence(i) for i in group]
    width = max(len(s["tokens"]) for s in seqs)
    k = data.topk_ids.shape[1]
    out = {
        "ids": torch.zeros(len(seqs), width, dtype=torch.long),
        "attention": torch.zeros(len(seqs), width, dtype=torch.long),
        "weight": torch.zeros(len(seqs), width),
        "top_rows": torch.full((len(seqs), width, k), -1, dtype=torch.long),
        "top_probs": torch.zeros(len(seqs), width, k),
    }
    for row, s in enumerate(seqs):
        n = len(s["tokens"])
        out["ids"][row, :n] = s["tokens"]
        out["attention"][row, :n] = 1
        out["weight"][row, :n] = torch.where(s["loss_mask"], 1.0, prompt_weight)
        out["top_rows"][row, :n] = remap[s["topk_ids"]]
        out["top_probs"][row, :n] = s["topk_logprobs"].float().exp()
    return out


def batch_loss(draft, batch: dict[str, torch.Tensor], ce_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted loss, per-position top-1 agreement) of the draft on a collated batch."""
    hidden = draft.model(input_ids=batch["ids"], attention_mask=batch["attention"]).last_hidden_state
    logq = torch.log_softmax(draft.lm_head(hidden).float(), dim=-1)
    rows = batch["top_rows"]
    present = rows >= 0
    picked = logq.gather(-1, rows.clamp_min(0)) * present
    soft = -(batch["top_probs"] * picked).sum(-1)
    top1 = -picked[..., 0]  # the target's own choice, when the draft can produce it
    per_position = soft + ce_weight * top1
    weight = batch["weight"]
    loss = (per_position * weight).sum() / weight.sum().clamp_min(1e-6)
    agree = (logq.argmax(-1) == rows[..., 0]).float()
    return loss, agree


@torch.no_grad()
def evaluate(draft, data: DistillData, indices: list[int], remap: torch.Tensor,
             cfg: TrainConfig) -> tuple[float, float]:
    """(mean loss, top-1 agreement with the target) at response positions of ``indices``.

    Top-1 agreement is what greedy acceptance depends on."""
    if not indices:
        return float("nan"), float("nan")
    draft.eval()
    hits = total = loss_sum = 0.0
    for group in batches(data, indices, cfg.batch_tokens):
        batch = collate(data, group, remap, 0.0)
        loss, agree = batch_loss(draft, batch, cfg.ce_weight)
        mask = batch["weight"] > 0
        hits += float(agree[mask].sum())
        total += float(mask.sum())
        loss_sum += float(loss) * float(mask.sum())
    return loss_sum / max(total, 1.0), hits / max(total, 1.0)


def train(target: LoadedModel, data: DistillData, out: str | Path, cfg: TrainConfig, resume: bool = False,
          progress: bool = True) -> dict[str, Any]:
    """Train (or resume) a draft into ``out``; checkpoints after every epoch; returns the saved config."""
    out = Path(out)
    full_vocab = target.model.get_output_embeddings().weight.shape[0]
    torch.manual_seed(cfg.seed)
    if resume:
        if not (out / OPTIMIZER).is_file():
            raise HastenError(f"nothing to resume in {out} (no {OPTIMIZER})")
        draft, vocab_ids, saved = load_draft_dir(target.model, out)
        state = torch.load(out / OPTIMIZER, weights_only=True)
        history, first_epoch = saved["history"], saved["epochs_done"]
    else:
        vocab_ids = choose_vocab(data, cfg.draft_vocab, full_vocab, target.eos_token_ids)
        draft = build_draft(target.model, vocab_ids, cfg.layers)
        state, history, first_epoch = None, [], 0
    draft.float()
    remap = torch.full((full_vocab,), -1, dtype=torch.long)
    remap[vocab_ids] = torch.arange(len(vocab_ids))
    params = [p for name, p in draft.named_parameters() if name in trainable_state(draft)]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    train_ids, val_ids = split_sequences(data, cfg.val_fraction, cfg.seed)
    steps_per_epoch = len(batches(data, train_ids, cfg.batch_tokens))
    total_steps = max(1, steps_per_epoch * cfg.epochs)
    step = first_epoch * steps_per_epoch
    if not history:
        val_loss, val_top1 = evaluate(draft, data, val_ids, remap, cfg)
        history.append({"epoch": 0, "val_loss": val_loss, "val_top1": val_top1})
    info: dict[str, Any] = {}
    for epoch in range(first_epoch, cfg.epochs):
        draft.train()
        groups = batches(data, train_ids, cfg.batch_tokens)
        random.Random(cfg.seed + epoch).shuffle(groups)
        bar = tqdm(groups, desc=f"draft epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not progress)
        losses = []
        began = time.perf_counter()
        for group in bar:
            lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))  # cosine decay to 0
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss, _ = batch_loss(draft, collate(data, group, remap, cfg.prompt_weight), cfg.ce_weight)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            step += 1
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        val_loss, val_top1 = evaluate(draft, data, val_ids, remap, cfg)
        history.append({"epoch": epoch + 1, "train_loss": sum(losses) / max(len(losses), 1), "val_loss": val_loss,
                        "val_top1": val_top1, "seconds": round(time.perf_counter() - began, 1)})
        if progress:
            print(f"epoch {epoch + 1}: train loss {history[-1]['train_loss']:.3f}, val loss {val_loss:.3f}, "
                  f"val top-1 agreement {val_top1:.3f}")
        info = {"base": target.name, "init_layers": cfg.layers, "train": vars(cfg), "data": data.meta,
                "history": history, "epochs_done": epoch + 1}
        save_draft(draft, vocab_ids, out, info, dtype=torch.float32)
        torch.save({"optimizer": optimizer.state_dict()}, out / OPTIMIZER)
    if not info:  # resumed a finished run
        info = json.loads((out / CONFIG).read_text())
    return info


def register(train_subparsers: argparse._SubParsersAction) -> None:
    parser = train_subparsers.add_parser("draft", help="distil a small draft model for --method draft")
    parser.add_argument("--model", default="default", help="the target the data was built from")
    parser.add_argument("--data", default=DEFAULT_OUT, help="self-distillation data directory (hasten train data)")
    parser.add_argument("--out", default="out/draft", help="checkpoint directory (fp32 weights + optimizer)")
    parser.add_argument("--layers", default="0,29", help="target layers that initialise the draft's layers")
    parser.add_argument("--draft-vocab", type=int, default=8192, help="output vocabulary of the draft")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per batch")
    parser.add_argument("--prompt-weight", type=float, default=0.1, help="loss weight of prompt positions")
    parser.add_argument("--ce-weight", type=float, default=0.2, help="weight of the hard top-1 cross-entropy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    parser.add_argument("--export", default=None, help="also write an fp16 copy (no optimizer) here at the end")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from hasten.models import load_model

    try:
        layers = [int(x) for x in args.layers.split(",") if x.strip()]
    except ValueError as error:
        raise HastenError(f"--layers takes comma-separated layer indices, got {args.layers!r}") from error
    if args.epochs < 1 or args.draft_vocab < 2 or args.batch_tokens < 1 or args.lr <= 0:
        raise HastenError("--epochs, --batch-tokens must be >= 1, --draft-vocab >= 2 and --lr > 0")
    data = load_shards(args.data)
    target = load_model(args.model)
    if data.meta.get("model") != target.name:
        raise HastenError(f"{args.data} was built from {data.meta.get('model')!r}, not {target.name!r}")
    cfg = TrainConfig(layers, args.draft_vocab, args.epochs, args.lr, args.batch_tokens, args.prompt_weight,
                      args.ce_weight, seed=args.seed)
    info = train(target, data, args.out, cfg, resume=args.resume)
    if args.export:
        draft, vocab_ids, _ = load_draft_dir(target.model, args.out)
        save_draft(draft, vocab_ids, args.export, info, dtype=torch.float16)
        print(f"exported the fp16 draft to {args.export}")
    return 0
