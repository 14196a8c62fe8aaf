"""``hasten train draft``: distil a small reduced-vocabulary draft (``hasten.draft``) from the target's answers.

Data is either a ``hasten train data`` directory (soft labels: the target's top-K log-probs) or a directory of
token-only answer files such as ``../shared/data/distill-smollm2`` (hard labels: the target's own next token),
read lazily (``hasten.training.token_data``). Validation holds out whole prompts, with every answer to them.
Only the draft's layers and final norm are trained. Checkpoints (fp32 weights, optimizer, history) are written
every ``--save-every`` steps and at each epoch's end; ``--resume`` continues from the last one, mid-epoch included.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from hasten.draft.model import CONFIG, WEIGHTS, build_draft, load_draft_dir, read_draft_dir, save_draft, trainable_state
from hasten.errors import HastenError
from hasten.models import LoadedModel
from hasten.training.draft_batches import batch_loss, collate, evaluate, length_batches
from hasten.training.schedule import floor_of, warmup_cosine
from hasten.training.selfdistill import DEFAULT_OUT, META, DistillData, load_shards
from hasten.training.token_data import Corpus, shard_corpus, split_by_prompt, token_corpus, union

OPTIMIZER = "optimizer.pt"
AUTOCAST = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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
    eval_every: int = 0  # steps between validations (0: at each epoch's end only)
    save_every: int = 0  # steps between checkpoints (0: at each epoch's end only)
    warmup: int = 0  # steps of linear learning-rate warm-up before the cosine decay
    min_lr: float | None = None  # the cosine's floor (None: schedule.DEFAULT_FLOOR of the peak)
    autocast: str | None = None  # "bfloat16": training passes in bfloat16 (weights, optimizer, validation fp32)


def top_vocab(mass: torch.Tensor, size: int, always: set[int] | frozenset[int]) -> torch.Tensor:
    """The ``size`` ids of most ``mass``, sorted; ``always`` (end-of-sequence ids) is always in, and ties go to the
    lowest ids, which in BPE vocabularies are the earliest, most frequent merges."""
    mass = mass.double() - torch.arange(len(mass), dtype=torch.float64) * 1e-9
    for token in always:
        mass[token] = float("inf")
    return mass.topk(min(size, len(mass))).indices.sort().values


def choose_vocab(data: DistillData | Corpus, size: int, full_vocab: int, always: set[int] | frozenset[int],
                 items: list[int] | None = None) -> torch.Tensor:
    """The ``size`` tokens the target most often predicts (top-K probability mass, or label counts) in ``items``."""
    corpus = data if isinstance(data, Corpus) else shard_corpus(data)
    return top_vocab(corpus.token_mass(items if items is not None else list(range(len(corpus))), full_vocab),
                     size, always)


def split_sequences(data: DistillData, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, validation) sequence indices of shard data (one answer per prompt, so a split by prompt)."""
    return split_by_prompt(shard_corpus(data), val_fraction, seed)


def learning_rate(cfg: TrainConfig, step: int, total: int) -> float:
    """Linear warm-up, then a cosine from ``cfg.lr`` down to the floor, reached at the last of ``total`` steps."""
    return warmup_cosine(step, total, cfg.lr, floor_of(cfg.lr, cfg.min_lr), cfg.warmup)


def save_checkpoint(draft, vocab_ids: torch.Tensor, optimizer: torch.optim.Optimizer, out: Path,
                    info: dict[str, Any]) -> None:
    """fp32 weights, config and optimizer, each file replaced atomically (a kill leaves the last checkpoint)."""
    partial = out / ".partial"
    save_draft(draft, vocab_ids, partial, info, dtype=torch.float32)
    torch.save({"optimizer": optimizer.state_dict()}, partial / OPTIMIZER)
    for name in (OPTIMIZER, WEIGHTS, CONFIG):  # the config last: it says which step the others belong to
        os.replace(partial / name, out / name)
    partial.rmdir()


def _start(target: LoadedModel, corpus: Corpus, train_items: list[int], out: Path, cfg: TrainConfig,
           resume: bool, init: str | Path | None) -> tuple[Any, torch.Tensor, dict | None, list, int]:
    """(draft, vocab ids, optimizer state, history, steps done) for a fresh, initialised or resumed run."""
    if resume:
        if not (out / OPTIMIZER).is_file():
            raise HastenError(f"nothing to resume in {out} (no {OPTIMIZER})")
        draft, vocab_ids, saved = load_draft_dir(target.model, out)
        state = torch.load(out / OPTIMIZER, weights_only=True)
        return draft, vocab_ids, state, saved["history"], saved.get("steps_done", 0) or -saved["epochs_done"]
    full_vocab = target.model.get_output_embeddings().weight.shape[0]
    vocab_ids = choose_vocab(corpus, cfg.draft_vocab, full_vocab, target.eos_token_ids, train_items)
    if init is None:
        return build_draft(target.model, vocab_ids, cfg.layers), vocab_ids, None, [], 0
    # the layers read the target's embeddings and feed the target's own head rows: they fit any vocabulary
    tensors, _, saved = read_draft_dir(init)
    cfg.layers = list(saved["init_layers"])
    draft = build_draft(target.model, vocab_ids, cfg.layers)
    missing = set(trainable_state(draft)) - set(tensors)
    if missing:
        raise HastenError(f"the draft in {init} lacks {sorted(missing)[0]}")
    draft.load_state_dict({k: v.to(draft.lm_head.weight.dtype) for k, v in tensors.items()}, strict=False)
    return draft, vocab_ids, None, [], 0


def train(target: LoadedModel, data: DistillData | Corpus, out: str | Path, cfg: TrainConfig, resume: bool = False,
          progress: bool = True, init: str | Path | None = None) -> dict[str, Any]:
    """Train (or resume) a draft into ``out``; returns the saved config. ``init``: a saved draft whose layers and
    norm to start from instead of the target's layers ``cfg.layers`` (the vocabulary is chosen from the data)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = data if isinstance(data, Corpus) else shard_corpus(data)
    torch.manual_seed(cfg.seed)
    train_items, val_items = split_by_prompt(corpus, cfg.val_fraction, cfg.seed)
    steps_per_epoch = len(length_batches(corpus.lengths, train_items, cfg.batch_tokens))
    draft, vocab_ids, state, history, step = _start(target, corpus, train_items, out, cfg, resume, init)
    if step < 0:  # a checkpoint written before steps were counted: whole epochs
        step = -step * steps_per_epoch
    draft.float()
    remap = torch.full((target.model.get_output_embeddings().weight.shape[0],), -1, dtype=torch.long)
    remap[vocab_ids] = torch.arange(len(vocab_ids))
    params = [p for name, p in draft.named_parameters() if name in trainable_state(draft)]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    total_steps = max(1, steps_per_epoch * cfg.epochs)

    def validate(losses: list[float], began: float) -> None:
        val_loss, val_top1 = evaluate(draft, corpus, val_items, remap, cfg.batch_tokens, cfg.ce_weight, progress)
        entry = {"epoch": round(step / steps_per_epoch, 4), "step": step, "val_loss": val_loss, "val_top1": val_top1}
        if losses:
            entry.update(train_loss=sum(losses) / len(losses), seconds=round(time.perf_counter() - began, 1))
        history.append(entry)
        if progress:
            tqdm.write(f"step {step} (epoch {entry['epoch']:.3f}): train loss {entry.get('train_loss', math.nan):.3f}"
                       f", val loss {val_loss:.3f}, val top-1 agreement {val_top1:.4f}", file=sys.stderr)

    def info() -> dict[str, Any]:
        return {"base": target.name, "init_layers": cfg.layers, "train": vars(cfg), "data": corpus.meta,
                "history": history, "epochs_done": step // steps_per_epoch, "steps_done": step}

    if not history:
        validate([], time.perf_counter())
    interactive = sys.stderr.isatty()
    for epoch in range(step // steps_per_epoch, cfg.epochs):
        draft.train()
        groups = length_batches(corpus.lengths, train_items, cfg.batch_tokens, seed=cfg.seed + epoch)
        done = step - epoch * steps_per_epoch
        bar = tqdm(groups[done:], desc=f"draft epoch {epoch + 1}/{cfg.epochs}", unit="batch", initial=done,
                   total=len(groups), disable=not progress, mininterval=1 if interactive else 60)
        losses: list[float] = []
        began = time.perf_counter()
        for group in bar:
            for g in optimizer.param_groups:
                g["lr"] = learning_rate(cfg, step, total_steps)
            batch = collate(corpus, group, remap, cfg.prompt_weight)
            with torch.autocast("cpu", dtype=AUTOCAST[cfg.autocast or "float32"], enabled=cfg.autocast is not None):
                loss, _, _ = batch_loss(draft, batch, cfg.ce_weight)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            step += 1
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
            last = step % steps_per_epoch == 0
            if cfg.eval_every and step % cfg.eval_every == 0 and not last:
                validate(losses, began)
                losses, began = [], time.perf_counter()
            if cfg.save_every and step % cfg.save_every == 0 and not last:
                save_checkpoint(draft, vocab_ids, optimizer, out, info())
        bar.close()
        validate(losses, began)
        save_checkpoint(draft, vocab_ids, optimizer, out, info())
    if step == 0 or not (out / CONFIG).is_file():
        save_checkpoint(draft, vocab_ids, optimizer, out, info())
    return json.loads((out / CONFIG).read_text())


def register(train_subparsers: argparse._SubParsersAction) -> None:
    parser = train_subparsers.add_parser("draft", help="distil a small draft model for --method draft")
    parser.add_argument("--model", default="default", help="the target the data was built from")
    parser.add_argument("--data", nargs="+", default=[DEFAULT_OUT],
                        help="a `hasten train data` directory, or a directory of token-only answer files; several "
                             "are trained on together")
    parser.add_argument("--file-weights", default="",
                        help="token data: loss weight per file, e.g. 'greedy*=1,sampled*=0.5' (0 leaves a file out)")
    parser.add_argument("--val-files", default="greedy*",
                        help="token data: the files whose held-out answers measure agreement (greedy answers)")
    parser.add_argument("--out", default="out/draft", help="checkpoint directory (fp32 weights + optimizer)")
    parser.add_argument("--layers", default="0,29", help="target layers that initialise the draft's layers")
    parser.add_argument("--init", default=None,
                        help="start from this saved draft's layers and norm (the vocabulary is chosen from the data)")
    parser.add_argument("--draft-vocab", type=int, default=8192, help="output vocabulary of the draft")
    parser.add_argument("--epochs", type=int, default=4,
                        help="passes over the data (default 4; the learning rate falls to --min-lr over all of them)")
    parser.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    parser.add_argument("--min-lr", type=float, default=None,
                        help="floor of the cosine decay, reached at the last step (default: 10%% of --lr)")
    parser.add_argument("--warmup", type=int, default=0, help="steps of linear learning-rate warm-up")
    parser.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per batch")
    parser.add_argument("--prompt-weight", type=float, default=0.1, help="loss weight of prompt positions")
    parser.add_argument("--ce-weight", type=float, default=0.2, help="weight of the hard top-1 cross-entropy")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="share of prompts held out")
    parser.add_argument("--eval-every", type=int, default=0, help="steps between validations (0: per epoch)")
    parser.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: per epoch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true",
                        help="continue from the checkpoint in --out (its settings; --epochs may extend the run)")
    parser.add_argument("--autocast", choices=["bfloat16"], default=None,
                        help="run the training passes in bfloat16 (fp32 weights and optimizer; validation in fp32): "
                             "several times faster on a CPU with native bfloat16 (avx512_bf16, amx_bf16)")
    parser.add_argument("--export", default=None, help="also write an fp16 copy (no optimizer) here at the end")
    parser.set_defaults(run=run)


def load_data(args: argparse.Namespace, target: LoadedModel) -> DistillData | Corpus:
    """Each ``--data`` directory: the shard data of ``hasten train data`` (checked against the target) or a
    token-only corpus; several are joined into one corpus."""
    parts: list[DistillData | Corpus] = []
    for directory in args.data:
        if (Path(directory) / META).is_file():
            data = load_shards(directory)
            if data.meta.get("model") != target.name:
                raise HastenError(f"{directory} was built from {data.meta.get('model')!r}, not {target.name!r}")
            parts.append(data)
        else:
            parts.append(token_corpus(directory, args.file_weights, args.val_files))
    if len(parts) == 1:
        return parts[0]
    return union([p if isinstance(p, Corpus) else shard_corpus(p) for p in parts])


def run(args: argparse.Namespace) -> int:
    from hasten.models import load_model

    try:
        layers = [int(x) for x in args.layers.split(",") if x.strip()]
    except ValueError as error:
        raise HastenError(f"--layers takes comma-separated layer indices, got {args.layers!r}") from error
    if args.epochs < 1 or args.draft_vocab < 2 or args.batch_tokens < 1 or args.lr <= 0:
        raise HastenError("--epochs, --batch-tokens must be >= 1, --draft-vocab >= 2 and --lr > 0")
    if args.min_lr is not None and not 0 <= args.min_lr <= args.lr:
        raise HastenError(f"--min-lr must be in [0, --lr], got {args.min_lr}")
    if not 0 <= args.val_fraction < 1:
        raise HastenError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    cfg = TrainConfig(layers, args.draft_vocab, args.epochs, args.lr, args.batch_tokens, args.prompt_weight,
                      args.ce_weight, args.val_fraction, args.seed, args.eval_every, args.save_every, args.warmup,
                      args.min_lr, args.autocast)
    if args.resume and (Path(args.out) / CONFIG).is_file():  # the run's own settings; only the length may change
        saved = json.loads((Path(args.out) / CONFIG).read_text()).get("train", {})
        cfg = TrainConfig(**{**saved, "epochs": args.epochs, "eval_every": args.eval_every or saved.get(
            "eval_every", 0), "save_every": args.save_every or saved.get("save_every", 0)})
    target = load_model(args.model, backend="transformers")
    data = load_data(args, target)
    info = train(target, data, args.out, cfg, resume=args.resume, init=None if args.resume else args.init)
    if args.export:
        draft, vocab_ids, _ = load_draft_dir(target.model, args.out)
        save_draft(draft, vocab_ids, args.export, info, dtype=torch.float16)
        print(f"exported the fp16 draft to {args.export}")
    return 0
