"""Training examples for the draft: token-only answer files, or ``hasten train data`` shards, behind one interface.

Token-only files (``../shared/data/distill-smollm2``, one safetensors file per decoding pass) hold ``tokens`` (T,),
``seq_starts`` int64 (S+1,), ``prompt_lens`` int64 (S,) and ``prompt_index`` int64 (S,) (the prompt answered, the
same numbering in every file of a directory); ``topk_ids``/``topk_logprobs`` (T, K), when a file has them, are
soft labels. A file is memory-mapped: only its index arrays are read up front, a sequence's tokens when a batch
needs them.

An *example* is one sequence: ``tokens`` (L,), ``loss_mask`` (L,) True where the NEXT token is an answer token,
and optionally ``topk_ids``/``topk_logprobs`` (L, K). Without top-K the label at a position is the next token.
"""

from __future__ import annotations

import fnmatch
import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open

from hasten.errors import HastenError

TOKEN_KEYS = ("tokens", "seq_starts", "prompt_lens", "prompt_index")
SOFT_KEYS = ("topk_ids", "topk_logprobs")


class Shards(Protocol):
    """What a corpus needs of ``hasten train data`` shards (``selfdistill.DistillData``): their sequences."""

    meta: dict[str, Any]
    seq_starts: torch.Tensor

    @property
    def num_sequences(self) -> int: ...

    def sequence(self, index: int) -> dict[str, torch.Tensor]: ...


class TokenFile:
    """One token-only file, memory-mapped; ``example(i)`` reads sequence ``i``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._handle = safe_open(str(self.path), framework="pt")
        keys = set(self._handle.keys())
        missing = [k for k in TOKEN_KEYS if k not in keys]
        if missing:
            raise HastenError(f"{self.path} is not a token data file: it lacks {', '.join(missing)}")
        self.seq_starts = self._handle.get_tensor("seq_starts").long()
        self.prompt_lens = self._handle.get_tensor("prompt_lens").long()
        self.prompt_index = self._handle.get_tensor("prompt_index").long()
        self.soft = all(k in keys for k in SOFT_KEYS)
        if not len(self.seq_starts) - 1 == len(self.prompt_lens) == len(self.prompt_index):
            raise HastenError(f"{self.path}: seq_starts, prompt_lens and prompt_index disagree on the sequence count")

    def __len__(self) -> int:
        return len(self.prompt_lens)

    def lengths(self) -> list[int]:
        return (self.seq_starts[1:] - self.seq_starts[:-1]).tolist()

    def tokens(self, index: int) -> torch.Tensor:
        a, b = int(self.seq_starts[index]), int(self.seq_starts[index + 1])
        return self._handle.get_slice("tokens")[a:b].long()

    def example(self, index: int) -> dict[str, torch.Tensor]:
        a, b = int(self.seq_starts[index]), int(self.seq_starts[index + 1])
        tokens = self._handle.get_slice("tokens")[a:b].long()
        mask = torch.zeros(b - a, dtype=torch.bool)
        mask[max(int(self.prompt_lens[index]) - 1, 0) : b - a - 1] = True
        out = {"tokens": tokens, "loss_mask": mask}
        if self.soft:
            out["topk_ids"] = self._handle.get_slice("topk_ids")[a:b].long()
            out["topk_logprobs"] = self._handle.get_slice("topk_logprobs")[a:b]
        return out


@dataclass
class Corpus:
    """Examples drawn from several sources: ``items`` are (source, sequence) pairs, each with a prompt id, a
    length, a loss weight and whether it may serve for validation."""

    sources: list[TokenFile | Shards]
    items: list[tuple[int, int]]
    prompts: list[int]
    lengths: list[int]
    weights: list[float]
    evaluable: list[bool]
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.items)

    def example(self, item: int) -> dict[str, torch.Tensor]:
        source, index = self.items[item]
        src = self.sources[source]
        return src.example(index) if isinstance(src, TokenFile) else src.sequence(index)

    def token_mass(self, items: list[int], vocab: int) -> torch.Tensor:
        """How often each token is the label at a loss position (top-K probability mass where present)."""
        mass = torch.zeros(vocab, dtype=torch.float64)
        for item in items:
            ex = self.example(item)
            if "topk_ids" in ex:
                mass.index_add_(0, ex["topk_ids"].flatten(), ex["topk_logprobs"].double().exp().flatten())
                mass.index_add_(0, ex["tokens"], torch.ones(len(ex["tokens"]), dtype=torch.float64))
            else:
                nxt = ex["tokens"][1:][ex["loss_mask"][:-1]]
                mass.index_add_(0, nxt, torch.full((len(nxt),), self.weights[item], dtype=torch.float64))
        return mass


def shard_corpus(data: Shards) -> Corpus:
    """``hasten train data`` shards as a corpus: one answer per prompt, every sequence may validate."""
    n = data.num_sequences
    lengths = (data.seq_starts[1:] - data.seq_starts[:-1]).tolist()
    return Corpus([data], [(0, i) for i in range(n)], list(range(n)), lengths, [1.0] * n, [True] * n, data.meta)


def parse_weights(spec: str) -> list[tuple[str, float]]:
    """``"greedy*=1,sampled*=0.5"`` -> [(pattern, weight)]; the first pattern a file's stem matches wins."""
    pairs = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        pattern, _, value = part.partition("=")
        try:
            pairs.append((pattern.strip(), float(value)))
        except ValueError as error:
            raise HastenError(f"file weights look like 'greedy*=1,sampled*=0.5', got {part!r}") from error
    return pairs


def token_corpus(directory: str | Path, weights: str = "", val_files: str = "greedy*") -> Corpus:
    """Every ``*.safetensors`` token file of ``directory``, its sequences weighted by the first pattern of
    ``weights`` its stem matches (1 by default; 0 leaves a file out). A sequence identical to one already taken
    (the greedy passes often agree) is dropped, so it is neither trained twice nor validated twice. Files whose stem
    matches ``val_files`` provide the validation answers (greedy ones: their next token is the target's top-1)."""
    paths = sorted(Path(directory).glob("*.safetensors"))
    if not paths:
        raise HastenError(f"{directory} holds no token data files (*.safetensors)")
    rules = parse_weights(weights)
    corpus = Corpus([], [], [], [], [], [], {"data": str(directory), "files": {}})
    seen: set[bytes] = set()
    for path in paths:
        weight = next((w for pattern, w in rules if fnmatch.fnmatch(path.stem, pattern)), 1.0)
        if weight <= 0:
            continue
        file = TokenFile(path)
        source = len(corpus.sources)
        corpus.sources.append(file)
        evaluable = fnmatch.fnmatch(path.stem, val_files)
        kept = 0
        for index, length in enumerate(file.lengths()):
            digest = hashlib.blake2b(file.tokens(index).numpy().tobytes(), digest_size=16).digest()
            if digest in seen:
                continue
            seen.add(digest)
            corpus.items.append((source, index))
            corpus.prompts.append(int(file.prompt_index[index]))
            corpus.lengths.append(length)
            corpus.weights.append(weight)
            corpus.evaluable.append(evaluable)
            kept += 1
        corpus.meta["files"][path.name] = {"sequences": len(file), "kept": kept, "weight": weight}
    if not corpus.items:
        raise HastenError(f"no sequences to train on in {directory} (every file weighted 0?)")
    corpus.meta["sequences"] = len(corpus.items)
    corpus.meta["tokens"] = sum(corpus.lengths)
    return corpus


def union(corpora: list[Corpus]) -> Corpus:
    """One corpus of several (a ``hasten train data`` directory beside token files, say). Each keeps its own
    sequences, weights and validation answers; prompt numbers are kept apart, so a split by prompt holds out
    prompts of each. (Two corpora that answer the same prompt text count it as two prompts.)"""
    joined = Corpus([], [], [], [], [], [], {"parts": [c.meta for c in corpora]})
    for corpus in corpora:
        offset, numbered = len(joined.sources), max(joined.prompts, default=-1) + 1
        joined.sources += corpus.sources
        joined.items += [(source + offset, index) for source, index in corpus.items]
        joined.prompts += [prompt + numbered for prompt in corpus.prompts]
        joined.lengths += corpus.lengths
        joined.weights += corpus.weights
        joined.evaluable += corpus.evaluable
    joined.meta["sequences"] = len(joined.items)
    joined.meta["tokens"] = sum(joined.lengths)
    return joined


def split_by_prompt(corpus: Corpus, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train items, validation items): a seeded share of the prompts is held out with every answer to them.

    Validation keeps only the evaluable answers of held-out prompts; the others are not trained on either."""
    prompts = sorted(set(corpus.prompts))
    random.Random(seed).shuffle(prompts)
    held = max(1, round(len(prompts) * val_fraction)) if len(prompts) > 1 and val_fraction > 0 else 0
    held_out = set(prompts[:held])
    train = [i for i, p in enumerate(corpus.prompts) if p not in held_out]
    val = [i for i, p in enumerate(corpus.prompts) if p in held_out and corpus.evaluable[i]]
    return train, val
