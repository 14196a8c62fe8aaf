"""Self-distillation data: the target's own answers, its last hidden states and its top-K next-token log-probs.

A data directory holds ``meta.json``, ``prompts.json`` (the plan, for resuming) and ``shard_00000.safetensors``,
... Each shard concatenates S sequences (chat-templated prompt + the target's response) and has:

* ``tokens`` int64 (T,), ``seq_starts`` int64 (S+1,) offsets of each sequence (last = T);
* ``loss_mask`` bool (T,): True where the NEXT token belongs to the response;
* ``hidden`` float16 (T, H): the target's last-layer hidden state (after the final norm, what the LM head sees);
* ``topk_ids`` int64 (T, K), ``topk_logprobs`` float16 (T, K): the target's top-K next-token log-probabilities.

Shards are written atomically and skipped when present, so an interrupted build resumes where it stopped.
Trainers read a directory with ``load_shards``.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from hasten.errors import HastenError
from hasten.models import LoadedModel, encode_prompt
from hasten.training.token_data import TokenFile

# The development prompt sets live in ``shared/data`` beside the project checkout (never copied into it).
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
SHARED_PROMPTS = [str(SHARED_DATA / f"{name}.jsonl") for name in ("alpacaeval_dev", "gsm8k_dev", "mbpp")]
DEFAULT_OUT = "out/distill"
META = "meta.json"
PLAN = "prompts.json"
MAX_PROMPT_CHARS = 600  # longer prompts are skipped: the data is about answers, not prompts

# A few prompts of our own, so that summarisation and rewriting are represented too.
BUILTIN_PROMPTS = [
    "Summarize in two sentences: The city council voted on Tuesday to extend the bike lane network by forty "
    "kilometres over the next three years. Supporters said it would reduce traffic and pollution, while "
    "shop owners worried about losing parking spaces in front of their stores.",
    "Summarize this paragraph: Photosynthesis is the process by which green plants use sunlight, water and "
    "carbon dioxide to make glucose and oxygen. It takes place mainly in the leaves, inside chloroplasts that "
    "contain the pigment chlorophyll.",
    "Give a short summary of the following text: The library will close for renovation from June to August. "
    "During that time, books can be returned at the community centre, and the online catalogue stays open.",
    "Rewrite this sentence to be more formal: hey, can u send me the report by tomorrow? thanks!",
    "Summarize: Regular exercise improves heart health, strengthens muscles and bones, helps control weight "
    "and can improve mood and sleep. Experts recommend at least 150 minutes of moderate activity per week.",
    "Write a Python function that returns the factorial of a number.",
    "Explain what a linked list is in simple terms.",
    "List three tips for writing clear emails.",
    "Summarize in one sentence: The company reported higher profits this quarter thanks to strong sales of "
    "its new phone, but warned that rising costs for parts could slow growth next year.",
    "What is the difference between a list and a tuple in Python?",
    "Write a short story about a cat who learns to swim, in four sentences.",
    "Explain why the sky is blue.",
]


@dataclass
class DistillData:
    """All shards of a directory, concatenated; ``seq_starts`` indexes the concatenation."""

    meta: dict[str, Any]
    tokens: torch.Tensor
    seq_starts: torch.Tensor
    loss_mask: torch.Tensor
    hidden: torch.Tensor
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor

    @property
    def num_sequences(self) -> int:
        return len(self.seq_starts) - 1

    def sequence(self, index: int) -> dict[str, torch.Tensor]:
        """The tensors of one sequence (same names as in a shard, without ``seq_starts``)."""
        a, b = int(self.seq_starts[index]), int(self.seq_starts[index + 1])
        return {name: getattr(self, name)[a:b] for name in
                ("tokens", "loss_mask", "hidden", "topk_ids", "topk_logprobs")}


def read_prompt_files(paths: list[str]) -> list[tuple[str, str]]:
    """(source, prompt) pairs from JSONL files with a ``prompt`` field."""
    pairs = []
    for path in paths:
        file = Path(path)
        if not file.is_file():
            raise HastenError(f"prompt file {path} not found")
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                prompt = json.loads(line)["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise HastenError(f"{path}:{number}: expected a JSON object with a 'prompt' field") from error
            if isinstance(prompt, str) and prompt.strip():
                pairs.append((file.name, prompt))
    return pairs


def plan_prompts(pairs: list[tuple[str, str]], limit: int, seed: int = 0) -> list[tuple[str, str]]:
    """Shuffle each source (seeded) and interleave them round-robin, so every source is represented."""
    by_source: dict[str, list[str]] = {}
    for source, prompt in pairs:
        by_source.setdefault(source, []).append(prompt)
    rng = random.Random(seed)
    for prompts in by_source.values():
        rng.shuffle(prompts)
    planned: list[tuple[str, str]] = []
    queues = [[(source, p) for p in prompts] for source, prompts in by_source.items()]
    while len(planned) < limit and any(queues):
        for queue in queues:
            if queue and len(planned) < limit:
                planned.append(queue.pop(0))
    return planned


def teacher_force(loaded: LoadedModel, sequences: list[list[int]], top_k: int,
                  max_batch_tokens: int = 2048) -> list[dict[str, torch.Tensor]]:
    """Run the target over whole sequences (batched, right-padded): hidden states and top-K log-probs."""
    model = loaded.model
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    results: dict[int, dict[str, torch.Tensor]] = {}
    start = 0
    while start < len(order):
        longest = len(sequences[order[start]])
        end = start + 1
        while end < len(order) and (end - start + 1) * max(longest, len(sequences[order[end]])) <= max_batch_tokens:
            longest = max(longest, len(sequences[order[end]]))
            end += 1
        batch = [sequences[i] for i in order[start:end]]
        ids = torch.zeros(len(batch), longest, dtype=torch.long)
        attention = torch.zeros(len(batch), longest, dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq)
            attention[row, : len(seq)] = 1
        with torch.inference_mode():
            hidden = model.model(input_ids=ids, attention_mask=attention).last_hidden_state
            head = model.get_output_embeddings()
            for row, index in enumerate(order[start:end]):
                h = hidden[row, : len(sequences[index])]
                logprobs = torch.log_softmax(head(h).float(), dim=-1)
                values, top = logprobs.topk(top_k, dim=-1)
                results[index] = {"hidden": h.to(torch.float16), "topk_ids": top,
                                  "topk_logprobs": values.to(torch.float16)}
        start = end
    return [results[i] for i in range(len(sequences))]


def batched_greedy(loaded: LoadedModel, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy answers of a left-padded batch with transformers' ``generate``: many times faster on a CPU (the
    weights are read once per step for the whole batch); padding may rarely flip a near-tie, which does not
    matter for training data since the targets are recomputed by teacher forcing."""
    width = max(len(p) for p in prompts)
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        attention[row, width - len(p) :] = 1
    eos = sorted(loaded.eos_token_ids)
    with torch.inference_mode():
        out = loaded.model.generate(ids, attention_mask=attention, max_new_tokens=max_new_tokens, do_sample=False,
                                    eos_token_id=eos or None, pad_token_id=pad)
    answers = []
    for row in out[:, width:].tolist():
        end = next((i for i, t in enumerate(row) if t in loaded.eos_token_ids), None)
        answers.append(row if end is None else row[: end + 1])
    return answers


def make_shard(loaded: LoadedModel, prompts: list[str], top_k: int, max_new_tokens: int,
               method: str = "pld", batch_size: int = 1) -> dict[str, torch.Tensor]:
    """Generate the target's greedy answers to ``prompts`` and teacher-force them into one shard.

    ``batch_size`` 1 generates with hasten (``method``); more uses ``batched_greedy``.
    """
    from hasten.api import generate  # imported here: the API imports the method registry

    encoded = [encode_prompt(loaded.tokenizer, prompt, chat=True) for prompt in prompts]
    if batch_size > 1:
        answers = [a for i in range(0, len(encoded), batch_size)
                   for a in batched_greedy(loaded, encoded[i : i + batch_size], max_new_tokens)]
    else:
        answers = [generate(loaded, ids, method, max_new_tokens=max_new_tokens, temperature=0.0).token_ids
                   for ids in encoded]
    sequences, masks = [], []
    for ids, answer in zip(encoded, answers, strict=True):
        seq = ids + answer
        mask = torch.zeros(len(seq), dtype=torch.bool)
        mask[len(ids) - 1 : len(seq) - 1] = True
        sequences.append(seq)
        masks.append(mask)
    return forced_shard(loaded, sequences, masks, top_k)


def forced_shard(loaded: LoadedModel, sequences: list[list[int]], masks: list[torch.Tensor],
                 top_k: int) -> dict[str, torch.Tensor]:
    """One shard: the sequences, their loss masks, and the target's hidden states and top-K from teacher forcing."""
    forced = teacher_force(loaded, sequences, top_k)
    lengths = torch.tensor([0] + [len(s) for s in sequences])
    return {
        "tokens": torch.tensor([t for s in sequences for t in s], dtype=torch.int64),
        "seq_starts": lengths.cumsum(0).to(torch.int64),
        "loss_mask": torch.cat(masks),
        "hidden": torch.cat([f["hidden"] for f in forced]),
        "topk_ids": torch.cat([f["topk_ids"] for f in forced]).to(torch.int64),
        "topk_logprobs": torch.cat([f["topk_logprobs"] for f in forced]),
    }


def claim_directory(out: str | Path, plan: dict[str, Any], what: str) -> Path:
    """The data directory ``out``, created with ``plan`` in it, or holding that same plan already (a resume)."""
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    plan_file = directory / PLAN
    if plan_file.is_file():
        if json.loads(plan_file.read_text()) != plan:
            raise HastenError(f"{directory} holds data built from other {what} or settings; use another --out")
    else:
        plan_file.write_text(json.dumps(plan, indent=1))
    return directory


def write_shards(directory: Path, sizes: list[int], make: Callable[[int], dict[str, torch.Tensor]], desc: str,
                 unit: str, progress: bool) -> None:
    """Write one shard per entry of ``sizes`` (its item count, for the progress bar) with ``make(index)``,
    atomically, skipping those already there (resume)."""
    bar = tqdm(total=sum(sizes), desc=desc, unit=unit, disable=not progress)
    for index, size in enumerate(sizes):
        path = shard_path(directory, index)
        if not path.is_file():
            partial = path.with_suffix(".tmp")
            save_file(make(index), str(partial))
            partial.replace(path)
        bar.update(size)
    bar.close()


def shard_path(directory: Path, index: int) -> Path:
    return directory / f"shard_{index:05d}.safetensors"


def build(loaded: LoadedModel, planned: list[tuple[str, str]], out: str | Path, top_k: int = 32,
          max_new_tokens: int = 96, shard_size: int = 16, method: str = "pld", progress: bool = True,
          batch_size: int = 1) -> dict:
    """Write the data directory for the (source, prompt) plan, skipping shards already there; returns meta."""
    if top_k < 1 or shard_size < 1 or max_new_tokens < 1:
        raise HastenError("--top-k, --shard-size and --max-new-tokens must be >= 1")
    if not planned:
        raise HastenError("no prompts to build data from")
    plan = {"model": loaded.name, "top_k": top_k, "max_new_tokens": max_new_tokens, "shard_size": shard_size,
            "prompts": [{"source": s, "prompt": p} for s, p in planned]}
    directory = claim_directory(out, plan, "prompts")
    chunks = [planned[i : i + shard_size] for i in range(0, len(planned), shard_size)]
    write_shards(directory, [len(c) for c in chunks],
                 lambda index: make_shard(loaded, [p for _, p in chunks[index]], top_k, max_new_tokens, method,
                                          batch_size),
                 "self-distillation", "prompt", progress)
    return write_meta(loaded, directory, len(chunks), top_k, sorted({s for s, _ in planned}), max_new_tokens)


def build_from_tokens(loaded: LoadedModel, token_path: str | Path, out: str | Path, top_k: int = 32,
                      shard_size: int = 16, limit: int | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Teacher-force the answers of a token-only file (``hasten.training.token_data``) into a data directory.

    The answers are already there, so only the target's hidden states and top-K log-probs are computed. With
    ``limit``, a seeded random subset of the sequences is taken. Shards are written atomically and skipped when
    present: an interrupted build resumes.
    """
    if top_k < 1 or shard_size < 1:
        raise HastenError("--top-k and --shard-size must be >= 1")
    source = TokenFile(token_path)
    order = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = order[:limit] if limit is not None else order
    if not chosen:
        raise HastenError("no sequences to build data from")
    plan = {"model": loaded.name, "top_k": top_k, "shard_size": shard_size, "token_file": Path(token_path).name,
            "token_file_sequences": len(source), "token_file_tokens": int(source.seq_starts[-1]),
            "sequences": chosen}
    directory = claim_directory(out, plan, "sequences")
    chunks = [chosen[i : i + shard_size] for i in range(0, len(chosen), shard_size)]

    def make(index: int) -> dict[str, torch.Tensor]:
        examples = [source.example(i) for i in chunks[index]]
        tokens = [e["tokens"].tolist() for e in examples]
        if max(max(t, default=0) for t in tokens) >= loaded.vocab_size:
            raise HastenError(f"{token_path} holds token ids outside {loaded.name}'s vocabulary")
        shard = forced_shard(loaded, tokens, [e["loss_mask"] for e in examples], top_k)
        return {**shard, "prompt_index": source.prompt_index[chunks[index]].clone()}

    write_shards(directory, [len(c) for c in chunks], make, "teacher forcing", "sequence", progress)
    return write_meta(loaded, directory, len(chunks), top_k, [Path(token_path).name], None)


def write_meta(loaded: LoadedModel, directory: Path, shards: int, top_k: int, prompts: list[str],
               max_new_tokens: int | None) -> dict:
    """Count the shards of a finished build and write ``meta.json``; returns it."""
    sequences = tokens = 0
    for index in range(shards):
        shard = load_file(str(shard_path(directory, index)))
        sequences += len(shard["seq_starts"]) - 1
        tokens += len(shard["tokens"])
        hidden_size = shard["hidden"].shape[1]
    meta = {"model": loaded.name, "top_k": top_k, "hidden_size": hidden_size, "sequences": sequences,
            "tokens": tokens, "prompts": prompts, "shards": shards, "max_new_tokens": max_new_tokens}
    (directory / META).write_text(json.dumps(meta, indent=1))
    return meta


def load_shards(directory: str | Path) -> DistillData:
    """Read every shard of a data directory into one ``DistillData``."""
    directory = Path(directory)
    if not (directory / META).is_file():
        raise HastenError(f"{directory} has no {META}; build it first with `hasten train data`")
    meta = json.loads((directory / META).read_text())
    paths = sorted(directory.glob("shard_*.safetensors"))
    if not paths:
        raise HastenError(f"{directory} has no shards")
    parts = [load_file(str(p)) for p in paths]
    starts, offset = [torch.zeros(1, dtype=torch.int64)], 0
    for part in parts:
        starts.append(part["seq_starts"][1:] + offset)
        offset += len(part["tokens"])
    cat = {name: torch.cat([p[name] for p in parts]) for name in
           ("tokens", "loss_mask", "hidden", "topk_ids", "topk_logprobs")}
    return DistillData(meta=meta, seq_starts=torch.cat(starts), **cat)


def register(train_subparsers: argparse._SubParsersAction) -> None:
    parser = train_subparsers.add_parser("data", help="build self-distillation data from the target's own answers")
    parser.add_argument("--model", default="default", help="the target: 'default', a model folder or a .gguf file")
    parser.add_argument("--prompts", nargs="+", default=None,
                        help="JSONL files with a 'prompt' field (default: ../shared/data beside the checkout)")
    parser.add_argument("--no-builtin", action="store_true", help="leave out hasten's own handful of prompts")
    parser.add_argument("--from-tokens", default=None, metavar="FILE",
                        help="teacher-force the answers of a token-only file (e.g. ../shared/data/distill-smollm2/"
                             "greedy_batch512.safetensors) instead of generating them; --limit picks a seeded "
                             "random subset of its sequences")
    parser.add_argument("--limit", type=int, default=None,
                        help="number of prompts, interleaved across files (default 240), or of --from-tokens "
                             "sequences (default all)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="answer length (default 96)")
    parser.add_argument("--max-prompt-chars", type=int, default=MAX_PROMPT_CHARS,
                        help=f"longer prompts are skipped (default {MAX_PROMPT_CHARS}; `hasten train prompts` "
                             "writes RAG and summarization prompts up to 1,500)")
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=16, help="sequences per shard")
    parser.add_argument("--method", default="pld", help="method that generates the answers (output is the same)")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="generate this many answers at once with transformers (1 = one by one with hasten)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt shuffle")
    parser.add_argument("--out", default=DEFAULT_OUT, help="output directory (resumes if it exists)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from hasten.models import load_model

    if args.limit is not None and args.limit < 1:
        raise HastenError(f"--limit must be >= 1, got {args.limit}")
    if args.from_tokens is not None:
        given = {"--prompts": args.prompts, "--no-builtin": args.no_builtin, "--method": args.method != "pld",
                 "--batch-size": args.batch_size != 1, "--max-new-tokens": args.max_new_tokens is not None}
        generating = [flag for flag, value in given.items() if value]
        if generating:
            raise HastenError(f"--from-tokens teacher-forces answers already written; {', '.join(generating)} "
                              "would generate them")
        loaded = load_model(args.model, backend="transformers")
        meta = build_from_tokens(loaded, args.from_tokens, args.out, args.top_k, args.shard_size, args.limit,
                                 args.seed)
        print(f"wrote {meta['sequences']} sequences, {meta['tokens']} tokens in {meta['shards']} shards to {args.out}")
        return 0
    files = args.prompts or [p for p in SHARED_PROMPTS if Path(p).is_file()]
    pairs = [(s, p) for s, p in read_prompt_files(files) if len(p) <= args.max_prompt_chars]
    if not args.no_builtin:
        pairs += [("builtin", p) for p in BUILTIN_PROMPTS]
    planned = plan_prompts(pairs, args.limit or 240, args.seed)
    loaded = load_model(args.model, backend="transformers")
    meta = build(loaded, planned, args.out, args.top_k, args.max_new_tokens or 96, args.shard_size, args.method,
                 batch_size=args.batch_size)
    print(f"wrote {meta['sequences']} sequences, {meta['tokens']} tokens in {meta['shards']} shards to {args.out}")
    return 0
