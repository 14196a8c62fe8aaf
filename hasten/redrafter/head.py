"""The recurrent draft head (Apple's ReDrafter), sized for a CPU.

Given the target's last-layer hidden state ``h`` at the position that produced the root token ``g0``, the
head drafts the tokens after ``g0``::

    s_0 = 0,   s_t = SiLU(W e_t + U s_{t-1} + b)      e_1 = embedding of g0 (the target's own, frozen table)
    logits_t = V . P(ResBlock^L([h, s_t])) + c        ResBlock(x) = x + SiLU(A x + a)

Deviation from the paper, forced by this CPU: instead of a learned ``2H x vocabulary`` output layer (56 M
parameters for SmolLM2), ``P`` projects to the target's hidden size and ``V`` is the target's own frozen output
embedding restricted to a *draft vocabulary* (the most frequent tokens of the target's outputs); ``c`` is a
learned bias over it. Tokens outside the draft vocabulary are never drafted, which costs acceptance, never
exactness: the verifier decides.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from hasten.backends.base import ModelBackend
from hasten.errors import HastenError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "head.safetensors"


@dataclass
class HeadConfig:
    """Shapes of a head and the target it was trained for."""

    hidden_size: int  # target's last-layer hidden size H
    embed_size: int  # target's input embedding size
    vocab_size: int  # target's vocabulary size
    draft_vocab_size: int
    state_size: int = 384
    num_layers: int = 1
    horizon: int = 4  # tokens per beam it was trained to draft (beam_length - 1)
    model: str = ""  # the target's name, for humans


@dataclass
class DraftTables:
    """Inference-only precomputations of a head for beam search (rebuilt when its weights or tables change)."""

    key: tuple[int, ...]
    input_rows: torch.Tensor  # (draft vocab, S): ``rnn_w`` applied to each draft-vocabulary token's embedding
    column: torch.Tensor  # (vocab,): the draft-vocabulary column of every target id, -1 outside it
    hidden_weight: torch.Tensor | None  # (H + S, H): the first residual block's weight on the hidden part
    state_weight: torch.Tensor | None  # (H + S, S): its weight on the recurrent state


@dataclass
class Prepared:
    """A head bound to one hidden state (1, H) for one beam search: the parts that do not change per step."""

    hidden: torch.Tensor
    first: torch.Tensor | None  # the first block's pre-activation from the hidden state and its bias (1, H + S)
    tables: DraftTables


class ResBlock(nn.Module):
    """``x + SiLU(A x + a)``, zero-initialised so that it starts as the identity."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(size, size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class ReDrafterHead(nn.Module):
    """Recurrent state + residual MLP + projection onto the target's output embeddings of the draft vocabulary.

    The target's tables (``embedding``: vocab x E input embeddings, ``output``: draft vocab x H output rows) are
    frozen buffers that are never saved; ``attach`` sets them from the target model.
    """

    def __init__(self, config: HeadConfig, draft_ids: torch.Tensor) -> None:
        super().__init__()
        if draft_ids.shape != (config.draft_vocab_size,):
            raise ValueError("draft_ids needs one target id per draft-vocabulary entry")
        self.config = config
        width = config.hidden_size + config.state_size
        self.rnn_w = nn.Linear(config.embed_size, config.state_size, bias=False)
        self.rnn_u = nn.Linear(config.state_size, config.state_size)
        self.blocks = nn.Sequential(*(ResBlock(width) for _ in range(config.num_layers)))
        self.proj = nn.Linear(width, config.hidden_size, bias=False)
        with torch.no_grad():
            self.proj.weight.mul_(0.1)  # start near uniform draft logits instead of large random ones
        self.vocab_bias = nn.Parameter(torch.zeros(config.draft_vocab_size))
        self.register_buffer("draft_ids", draft_ids.long().clone())
        self.embedding: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self._tables: DraftTables | None = None

    def attach(self, target: ModelBackend | nn.Module) -> ReDrafterHead:
        """Borrow the target's (frozen) input embeddings and its output rows of the draft vocabulary.

        ``target`` is a model backend, or a transformers module (training works on those directly, and places
        the head itself). On a backend the head moves to the target's device and dtype (its ``device`` and
        ``dtype`` where it names them; else where its embeddings are, in float32), so that beam search runs
        where the hidden states are.
        """
        if isinstance(target, nn.Module):
            embedding = target.get_input_embeddings().weight.detach()
            output = target.get_output_embeddings().weight.detach()
        else:
            embedding, output = target.input_embeddings(), target.output_embeddings()
            self.to(device=getattr(target, "device", None) or embedding.device, dtype=_float_dtype(target))
        expect = (self.config.vocab_size, self.config.embed_size)
        if tuple(embedding.shape) != expect or output.shape[1] != self.config.hidden_size:
            raise HastenError(
                f"this ReDrafter head was trained for a target with vocabulary x embedding {expect} and hidden "
                f"size {self.config.hidden_size} ({self.config.model or 'unknown model'}); the target has "
                f"{tuple(embedding.shape)} and {output.shape[1]}"
            )
        weight = self.proj.weight
        self.embedding = embedding.to(weight.device)
        self.output = output[self.draft_ids.to(output.device)].to(weight.device, weight.dtype).contiguous()
        self._tables = None
        return self

    def init_state(self, rows: int) -> torch.Tensor:
        return torch.zeros(rows, self.config.state_size, dtype=self.proj.weight.dtype, device=self.proj.weight.device)

    def step(self, state: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Advance the recurrent state by target token ids ``tokens`` (n,)."""
        assert self.embedding is not None, "attach() the head to its target first"
        embeds = self.embedding[tokens].to(state.dtype)
        return F.silu(self.rnn_w(embeds) + self.rnn_u(state))

    def logits(self, hidden: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary (n, draft vocab) from hidden states (n, H) and states (n, S)."""
        assert self.output is not None, "attach() the head to its target first"
        x = self.blocks(torch.cat([hidden.to(state.dtype), state], dim=-1))
        return self.proj(x) @ self.output.to(state.dtype).T + self.vocab_bias

    def tables(self) -> DraftTables:
        """The inference tables, rebuilt after ``attach`` and when a weight they hold was changed in place."""
        assert self.embedding is not None and self.output is not None, "attach() the head to its target first"
        weights = [self.rnn_w.weight, self.embedding, self.output, *(b.linear.weight for b in self.blocks[:1])]
        key = tuple(v for w in weights for v in (w.data_ptr(), 0 if w.is_inference() else w._version))
        if self._tables is None or self._tables.key != key:
            with torch.no_grad():
                embeds = self.embedding[self.draft_ids].to(self.rnn_w.weight.dtype)
                column = self.draft_ids.new_full((self.embedding.shape[0],), -1)
                column[self.draft_ids] = torch.arange(len(self.draft_ids), device=self.draft_ids.device)
                split = self.blocks[0].linear.weight.split([self.config.hidden_size, self.config.state_size], 1) \
                    if len(self.blocks) else (None, None)
                self._tables = DraftTables(key, self.rnn_w(embeds), column,
                                           *(w.contiguous() if w is not None else None for w in split))
        return self._tables

    def prepare(self, hidden: torch.Tensor) -> Prepared:
        """Bind the head to one hidden state (1, H) for ``advance``: its share of the first block is done once."""
        tables = self.tables()
        hidden = hidden.reshape(1, -1).to(self.proj.weight.device, self.proj.weight.dtype)
        first = None
        if tables.hidden_weight is not None:
            first = F.linear(hidden, tables.hidden_weight, self.blocks[0].linear.bias)
        return Prepared(hidden, first, tables)

    def advance(self, prepared: Prepared, state: torch.Tensor,
                tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``step`` then ``logits`` for beam search, in fewer passes over the weights: the new states and the
        log-probabilities over the draft vocabulary (n, draft vocab), equal to theirs up to round-off."""
        tables = prepared.tables
        columns = tables.column[tokens]
        # Drafted tokens' input projections are table rows; the root may lie outside the draft vocabulary, so
        # its row is computed too and chosen on the device (no host sync to ask which case this is).
        assert self.embedding is not None
        inputs = torch.where((columns >= 0)[:, None], tables.input_rows[columns.clamp(min=0)],
                             self.rnn_w(self.embedding[tokens].to(state.dtype)))
        state = F.silu(inputs + self.rnn_u(state))
        x = torch.cat([prepared.hidden.expand(state.shape[0], -1), state], dim=-1)
        if prepared.first is not None:
            assert tables.state_weight is not None
            x = x + F.silu(prepared.first + F.linear(state, tables.state_weight))
            for block in self.blocks[1:]:
                x = block(x)
        assert self.output is not None
        logits = self.proj(x) @ self.output.T + self.vocab_bias
        return state, torch.log_softmax(logits.float(), dim=-1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save(self, directory: str | Path, dtype: torch.dtype = torch.float16) -> None:
        """Write ``head.safetensors`` (learned weights in ``dtype`` + the draft vocabulary) and ``config.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(directory / WEIGHTS_FILE))
        (directory / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> ReDrafterHead:
        """Read a head saved by ``save`` (weights come back as float32 on the CPU; ``attach`` places it)."""
        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
            raise HastenError(f"{directory} is not a ReDrafter head (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
        try:
            config = HeadConfig(**json.loads((directory / CONFIG_FILE).read_text()))
            tensors = load_file(str(directory / WEIGHTS_FILE))
            head = cls(config, tensors["draft_ids"])
            head.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()})
        except (TypeError, KeyError, ValueError, RuntimeError, json.JSONDecodeError) as error:
            raise HastenError(f"could not read the ReDrafter head in {directory}: {error}") from error
        return head.eval()


def _float_dtype(target: object) -> torch.dtype:
    """The target's floating dtype when it names one (``dtype``), else float32 (the CPU's, and the llama.cpp
    backend's embedding tables')."""
    dtype = getattr(target, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32
