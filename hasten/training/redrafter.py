"""``hasten train redrafter``: distil the target into a ReDrafter head on self-distillation data.

Teacher forcing as in Apple's trainer: at a response position t the head gets the target's hidden state h_t
and the embeddings of tokens t+1..t+i, and learns the target's own next-token distribution at t+i (its top-K
log-probs, renormalised over the draft vocabulary) for i = 1..horizon, by soft cross-entropy.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from hasten.errors import HastenError
from hasten.redrafter.head import HeadConfig, ReDrafterHead
from hasten.training.schedule import floor_of, warmup_cosine
from hasten.training.selfdistill import DEFAULT_OUT, DistillData, load_shards

STATE_FILE = "trainer_state.pt"
DEFAULT_HEAD_OUT = "out/redrafter"


@dataclass
class TrainConfig:
    steps: int = 600
    batch_size: int = 256
    lr: float = 1e-3
    min_lr: float | None = None  # the cosine's floor (None: schedule.DEFAULT_FLOOR of the peak)
    warmup: float = 0.05  # fraction of the steps
    horizon: int = 4  # drafted tokens per beam the head learns (beam_length - 1)
    draft_vocab: int = 6144
    state_size: int = 384
    num_layers: int = 1
    holdout: float = 0.05  # fraction of sequences kept for evaluation
    all_positions: bool = True  # also learn the target's distributions inside the prompts (more data)
    seed: int = 0


def choose_draft_vocab(data: DistillData, size: int, vocab_size: int) -> torch.Tensor:
    """The ``size`` tokens the target most often says or considers (response tokens + top-K mass), sorted by id."""
    mask = data.loss_mask
    said = torch.bincount(data.tokens[1:][mask[:-1]], minlength=vocab_size).float()
    considered = torch.zeros(vocab_size).index_add_(
        0, data.topk_ids[mask].flatten(), data.topk_logprobs[mask].float().exp().flatten()
    )
    score = said + considered + 1e-6 * torch.bincount(data.tokens, minlength=vocab_size)
    return score.topk(min(size, vocab_size)).indices.sort().values


class Examples:
    """Response positions with their teacher-forced inputs and targets, mapped onto the draft vocabulary."""

    def __init__(self, data: DistillData, draft_ids: torch.Tensor, vocab_size: int, horizon: int,
                 all_positions: bool = False) -> None:
        total = len(data.tokens)
        ends = data.seq_starts[1:]
        end_of = ends[torch.searchsorted(ends, torch.arange(total), right=True)]
        # Response positions only, or every position: the target's distribution is a fair target anywhere.
        wanted = data.loss_mask | all_positions
        self.positions = torch.nonzero(wanted & (torch.arange(total) + 1 < end_of)).flatten()
        steps = self.positions[:, None] + torch.arange(1, horizon + 1)  # (N, horizon): t+1 .. t+horizon
        inside = steps < end_of[self.positions][:, None]
        steps = steps.clamp_max(total - 1)
        lookup = torch.full((vocab_size,), -1, dtype=torch.long)
        lookup[draft_ids] = torch.arange(len(draft_ids))
        self.data = data
        self.inputs = data.tokens[steps]  # token t+i enters the recurrence at step i
        index = lookup[data.topk_ids[steps]]  # (N, horizon, K) draft indices of the target's top-K at t+i
        probs = data.topk_logprobs[steps].float().exp() * (index >= 0)
        mass = probs.sum(-1, keepdim=True)
        self.target_index = index.clamp_min(0)
        self.target_probs = probs / mass.clamp_min(1e-8)
        self.valid = inside & wanted[steps] & (mass[..., 0] > 0.05)

    def __len__(self) -> int:
        return len(self.positions)

    def batch(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden = self.data.hidden[self.positions[rows]].float()
        return hidden, self.inputs[rows], self.target_index[rows], self.target_probs[rows], self.valid[rows]


def distill_loss(head: ReDrafterHead, hidden: torch.Tensor, inputs: torch.Tensor, target_index: torch.Tensor,
                 target_probs: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed per-step soft cross-entropy and the per-step top-1 agreement with the target (horizon,)."""
    state = head.init_state(hidden.shape[0])
    loss = hidden.new_zeros(())
    agree = []
    for i in range(inputs.shape[1]):
        state = head.step(state, inputs[:, i])
        log_probs = torch.log_softmax(head.logits(hidden, state), dim=-1)
        ce = -(target_probs[:, i] * log_probs.gather(1, target_index[:, i])).sum(-1)
        weight = valid[:, i].float()
        count = weight.sum().clamp_min(1)
        loss = loss + (ce * weight).sum() / count
        hit = log_probs.argmax(-1) == target_index[:, i, 0]
        agree.append((hit.float() * weight).sum() / count)
    return loss, torch.stack(agree).detach()


def split_sequences(data: DistillData, holdout: float, seed: int) -> tuple[DistillData, DistillData | None]:
    """Keep a seeded ``holdout`` fraction of the sequences apart for evaluation."""
    count = data.num_sequences
    held = int(count * holdout)
    if held == 0:
        return data, None
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return subset(data, order[held:].sort().values), subset(data, order[:held].sort().values)


def subset(data: DistillData, sequences: torch.Tensor) -> DistillData:
    parts = [data.sequence(int(i)) for i in sequences]
    lengths = torch.tensor([0] + [len(p["tokens"]) for p in parts])
    cat = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    return DistillData(meta=data.meta, seq_starts=lengths.cumsum(0), **cat)


@torch.no_grad()
def evaluate(head: ReDrafterHead, examples: Examples, batch_size: int = 1024) -> dict[str, float | list[float]]:
    """Mean loss and per-step top-1 agreement with the target over every example."""
    head.eval()
    loss, agree, batches = 0.0, torch.zeros(examples.inputs.shape[1]), 0
    for start in range(0, len(examples), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(examples)))
        batch_loss, batch_agree = distill_loss(head, *examples.batch(rows))
        loss, agree, batches = loss + float(batch_loss), agree + batch_agree, batches + 1
    head.train()
    return {"loss": loss / max(batches, 1), "top1": [round(float(a), 4) for a in agree / max(batches, 1)]}


def train(data: DistillData, target: torch.nn.Module, out: str | Path, config: TrainConfig, resume: bool = False,
          model_name: str = "", progress: bool = True, save_every: int = 100, pause_after: int | None = None,
          eval_every: int = 500) -> dict:
    """Train (or resume) a head, save it to ``out`` (fp16 head + config, fp32 trainer state) and return a report.

    The state is saved every ``save_every`` steps, on Ctrl-C and at the end; ``pause_after`` stops this call
    after that many steps, as an interruption would (``resume`` continues exactly where it stopped). Every
    ``eval_every`` steps (0: never) the held-out loss and top-1 agreement join the report's ``curve``.
    """
    out = Path(out)
    torch.manual_seed(config.seed)
    vocab_size, embed_size = target.get_input_embeddings().weight.shape
    hidden_size = target.get_output_embeddings().weight.shape[1]
    if data.hidden.shape[1] != hidden_size:
        raise HastenError(f"the data's hidden size {data.hidden.shape[1]} is not the target's {hidden_size}")
    state = None
    if resume:
        if not (out / STATE_FILE).is_file():
            raise HastenError(f"nothing to resume in {out} (no {STATE_FILE})")
        state = torch.load(out / STATE_FILE, weights_only=True)
        config = TrainConfig(**{**state["train_config"], "steps": config.steps})
    train_data, held_data = split_sequences(data, config.holdout, config.seed)
    draft_ids = state["draft_ids"] if state else choose_draft_vocab(train_data, config.draft_vocab, vocab_size)
    head_config = HeadConfig(hidden_size, embed_size, vocab_size, len(draft_ids), config.state_size,
                             config.num_layers, config.horizon, model_name)
    head = ReDrafterHead(head_config, draft_ids).attach(target)
    examples = Examples(train_data, draft_ids, vocab_size, config.horizon, config.all_positions)
    held = Examples(held_data, draft_ids, vocab_size, config.horizon) if held_data is not None else None
    if len(examples) == 0:
        raise HastenError("the data has no response positions to train on")
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=0.0)
    warmup, floor = max(1, int(config.warmup * config.steps)), floor_of(config.lr, config.min_lr) / config.lr

    def schedule(step: int) -> float:  # a factor of the peak: warm-up, then a cosine to the floor at the last step
        return warmup_cosine(step, config.steps, 1.0, floor, warmup)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    step, history, curve = 0, [], []
    generator = torch.Generator().manual_seed(config.seed)
    if state:
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        step, history, curve = state["step"], state["history"], state.get("curve", [])
    def save() -> None:
        head.save(out)
        torch.save({"head": head.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "generator": generator.get_state(), "step": step,
                    "history": history, "curve": curve, "draft_ids": draft_ids, "train_config": asdict(config)},
                   out / STATE_FILE)

    head.train()
    began, stop = time.perf_counter(), config.steps if pause_after is None else min(config.steps, step + pause_after)
    bar = tqdm(total=config.steps, initial=step, desc="redrafter", unit="step", disable=not progress)
    try:
        while step < stop:
            rows = torch.randint(len(examples), (config.batch_size,), generator=generator)
            loss, agree = distill_loss(head, *examples.batch(rows))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            history.append(round(loss.item(), 4))
            bar.set_postfix(loss=f"{loss.item():.3f}", top1=f"{float(agree[0]):.2f}/{float(agree[-1]):.2f}")
            bar.update(1)
            if eval_every and held is not None and len(held) and step % eval_every == 0:
                curve.append({"step": step, **evaluate(head, held)})
            if step % save_every == 0:
                save()
    except KeyboardInterrupt:
        save()
        raise
    finally:
        bar.close()
    save()
    report = {"steps": step, "examples": len(examples), "draft_vocab": len(draft_ids),
              "parameters": head.num_parameters(), "train_s": round(time.perf_counter() - began, 1),
              "first_loss": history[0] if history else None, "last_loss": history[-1] if history else None}
    if held is not None and len(held):
        final = curve[-1] if curve and curve[-1]["step"] == step else {"step": step, **evaluate(head, held)}
        report["heldout"] = {"loss": final["loss"], "top1": final["top1"]}
        report["curve"] = curve
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report

def register(train_subparsers: argparse._SubParsersAction) -> None:
    parser = train_subparsers.add_parser("redrafter", help="train a ReDrafter head on self-distillation data")
    defaults = TrainConfig()
    parser.add_argument("--data", default=DEFAULT_OUT, help="self-distillation data (from `hasten train data`)")
    parser.add_argument("--model", default=None, help="the target (default: the model the data was built with)")
    parser.add_argument("--out", default=DEFAULT_HEAD_OUT, help="where to write the head")
    parser.add_argument("--steps", type=int, default=defaults.steps,
                        help="updates; the learning rate falls to --min-lr over all of them (the shipped head: 5000)")
    parser.add_argument("--resume", action="store_true", help="continue the training saved in --out")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate")
    parser.add_argument("--min-lr", type=float, default=None,
                        help="floor of the cosine decay, reached at the last step (default: 10%% of --lr)")
    parser.add_argument("--horizon", type=int, default=defaults.horizon, help="tokens drafted per beam")
    parser.add_argument("--draft-vocab", type=int, default=defaults.draft_vocab, help="draft vocabulary size")
    parser.add_argument("--state-size", type=int, default=defaults.state_size)
    parser.add_argument("--layers", type=int, default=defaults.num_layers, help="residual blocks")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--eval-every", type=int, default=500,
                        help="held-out loss and top-1 every N steps, for the report's curve (0: at the end only)")
    parser.add_argument("--response-only", action="store_true",
                        help="train on response positions only (default: prompt positions too)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from hasten.models import load_model

    for name in ("steps", "batch_size", "horizon", "draft_vocab", "state_size"):
        if getattr(args, name) < 1:
            raise HastenError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.layers < 0 or args.eval_every < 0 or not args.lr > 0:
        raise HastenError("--layers and --eval-every must be >= 0 and --lr > 0")
    if args.min_lr is not None and not 0 <= args.min_lr <= args.lr:
        raise HastenError(f"--min-lr must be in [0, --lr], got {args.min_lr}")
    data = load_shards(args.data)
    name = args.model or data.meta.get("model", "default")
    loaded = load_model(name, backend="transformers")
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr,
                         horizon=args.horizon, draft_vocab=args.draft_vocab, state_size=args.state_size,
                         num_layers=args.layers, seed=args.seed, all_positions=not args.response_only)
    report = train(data, loaded.model, args.out, config, resume=args.resume, model_name=name,
                   eval_every=args.eval_every)
    print(json.dumps(report))
    print(f"wrote the head to {args.out}; use it with --method redrafter --head {args.out}")
    return 0
