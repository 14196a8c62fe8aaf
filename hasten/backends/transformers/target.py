"""The transformers backend: any causal LM that honours 4-D attention masks and explicit position ids.

Each sequence has a static KV cache (``static_kv.StaticKV``): a pass writes its rows at the next slots and attends
through an additive 4-D mask kept on the device (``static_kv.TreeMask``); chains and trees take the same path.
Options of the loaded model (``TransformersModel``):

* ``max_context``: cache slots per sequence (default: the model's context, at most 4096).
* ``pass_width``: pad every pass to at least this width, wider ones to the next power of two. Pad rows attend
  to the cache and themselves, write beyond the committed length and are never returned. Default on CUDA
  ``CUDA_PASS_WIDTH``: every pass of a generation, ``ar`` included, then runs at one width, so each row's
  logits come from the same kernels whatever method drafted the others (bf16 greedy exactness by
  construction). Default on the CPU: no padding (a pass costs what its tokens cost).
* ``graphs``: replay one CUDA graph per width (``cuda_graphs.GraphRunner``); default on CUDA, impossible on the
  CPU. The prefill stays eager.

On CUDA a pass attends over every slot of the cache (one shape for every pass); on the CPU over the committed
tokens and the pass only, as plain decoding would.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Sequence

import torch
from transformers import PretrainedConfig, PreTrainedModel

from hasten.backends.base import Scores
from hasten.backends.transformers.cuda_graphs import GraphRunner, Outputs
from hasten.backends.transformers.pass_inputs import PassInputs
from hasten.backends.transformers.static_kv import StaticKV, TreeMask, causal_block, padded_ancestor_mask, window_mask
from hasten.errors import HastenError
from hasten.tree import depths_of

# Architectures whose attention takes a custom 4-D mask with explicit position ids (checked in the tests).
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3_text", "phi3", "olmo2"})
SUPPORTED_ATTENTION = frozenset({"sdpa", "eager"})
DEFAULT_CONTEXT = 2048  # for a config without max_position_embeddings
MAX_CAPACITY = 4096  # default cap of the cache slots per sequence
CUDA_PASS_WIDTH = 64  # every pass on CUDA is padded to this width (wider ones to the next power of two)
MAX_GRAPH_WIDTH = 256  # wider passes run eagerly
SLOT_ALIGNMENT = 64  # cache slots (the mask's last dimension) rounded up: fused attention kernels want aligned rows
# Architectures whose model builds one mask for every layer, windowed whenever config.sliding_window is set
# (MistralModel, Phi3Model; they ignore layer_types). The others window only the layers layer_types names
# "sliding_attention" (Gemma 3, Qwen2/3 with use_sliding_window), or none (llama, gemma, olmo2 never slide).
EVERY_LAYER_SLIDES = frozenset({"mistral", "phi3"})

__all__ = ["TransformersModel", "TransformersTarget", "check_supported"]


def check_supported(model: PreTrainedModel) -> None:
    """Refuse, with a clear message, a model the tree verifier cannot drive."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise HastenError(
            f"model type {model_type!r} is not supported: hasten verifies trees through 4-D attention masks, "
            f"tested on {', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
        )
    attention = getattr(model.config, "_attn_implementation", None)
    if attention not in SUPPORTED_ATTENTION:
        raise HastenError(f"attention implementation {attention!r} is not supported; load with sdpa or eager")


def sliding_window(config: PretrainedConfig, max_context: int) -> tuple[int | None, bool]:
    """The window of the model's sliding layers and whether every layer slides (else those ``layer_types`` names).
    A key is seen when its position is above the query's minus the window (transformers' convention); a window
    of ``max_context`` or more closes nothing, so it is dropped."""
    window = getattr(config, "sliding_window", None)
    if not window or int(window) >= max_context:
        return None, False
    if config.model_type in EVERY_LAYER_SLIDES:
        return int(window), True
    layer_types = getattr(config, "layer_types", None) or ()
    return (int(window), False) if "sliding_attention" in layer_types else (None, False)


class TransformersModel:
    """A transformers causal LM as a ``ModelBackend`` (see the module docstring for the options)."""

    backend = "transformers"

    def __init__(self, model: PreTrainedModel, *, max_context: int | None = None, pass_width: int | None | str = "auto",
                 graphs: bool | None = None, static_span: bool | None = None) -> None:
        check_supported(model)
        self.model = model
        config = model.config
        on_cuda = model.device.type == "cuda"
        self.architecture = str(config.model_type)
        self.attention = str(config._attn_implementation)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        model_context = int(getattr(config, "max_position_embeddings", None) or DEFAULT_CONTEXT)
        self.max_context = min(model_context, max_context or MAX_CAPACITY)
        self.hidden_size = int(config.hidden_size)
        self.num_layers = int(config.num_hidden_layers)
        self.sliding_window, self.every_layer_slides = sliding_window(config, self.max_context)
        self.graphs = on_cuda if graphs is None else bool(graphs)
        if self.graphs and not on_cuda:
            raise HastenError("CUDA graphs need the model on a CUDA device")
        if pass_width == "auto":
            pass_width = CUDA_PASS_WIDTH if on_cuda else (1 if self.graphs else None)
        if pass_width is not None and (not isinstance(pass_width, int) or pass_width < 1):
            raise HastenError(f"pass_width must be an integer >= 1 or None, got {pass_width!r}")
        self.pass_width: int | None = pass_width if pass_width is not None or not self.graphs else 1
        self.static_span = (on_cuda or self.graphs) if static_span is None else bool(static_span)
        if self.graphs and not self.static_span:  # a replay reads every slot: unwritten ones must be zeros
            raise HastenError("CUDA graphs need static_span (every cache slot read, unwritten ones zero-filled)")
        parameters = inspect.signature(model.forward).parameters
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"  # renamed in transformers 5.2x
        self._spare: list[_SequenceState] = []

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def eos_token_ids(self) -> frozenset[int]:
        ids = self.model.generation_config.eos_token_id
        if ids is None:
            ids = self.model.config.eos_token_id
        if ids is None:
            return frozenset()
        return frozenset(ids if isinstance(ids, list) else [ids])

    def new_target(self, want_hidden: bool = False) -> TransformersTarget:
        return TransformersTarget(self, want_hidden)

    def input_embeddings(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight.detach()

    def output_embeddings(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight.detach()

    def transformers_config(self) -> PretrainedConfig:
        return self.model.config


class _SequenceState:
    """The device state of one sequence: cache, mask, staged inputs and captured graphs. A finished target's
    state goes back to its model for the next target, so the cache is allocated and the graphs captured once."""

    def __init__(self, backend: TransformersModel, want_hidden: bool) -> None:
        self.backend = backend
        reserve = MAX_GRAPH_WIDTH if backend.pass_width is not None else 0  # room for padded rows at the end
        self.num_slots = -(-(backend.max_context + reserve) // SLOT_ALIGNMENT) * SLOT_ALIGNMENT
        self.want_hidden = want_hidden
        self.cache = StaticKV(backend.num_layers, self.num_slots, zero_fill=backend.static_span)
        self.mask = TreeMask(self.num_slots, backend.dtype, backend.device,
                             rows=CUDA_PASS_WIDTH if backend.pass_width is not None else 1)
        self.inputs = PassInputs(backend.device, rows=CUDA_PASS_WIDTH)
        self.runner: GraphRunner | None = None
        self.layout = (0, 0)  # (mask, inputs) generations the graphs were captured with

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor,
                keep: int | torch.Tensor) -> Outputs:
        """One forward: rows written at ``slots``, attention through ``mask`` (w, span) over the first span slots."""
        backend, span = self.backend, mask.shape[-1]
        self.cache.slots, self.cache.span = slots, span
        attention: torch.Tensor | dict[str, torch.Tensor] = mask[None, None]
        if backend.sliding_window is not None:
            near = window_mask(mask, positions[0], self.mask.slot_positions[:span], backend.sliding_window)[None, None]
            attention = near if backend.every_layer_slides else {"full_attention": attention, "sliding_attention": near}
        out = backend.model(input_ids=ids, position_ids=positions, attention_mask=attention, use_cache=True,
                            logits_to_keep=keep, output_hidden_states=self.want_hidden,
                            **{backend.cache_argument: self.cache})
        return out.logits[0], out.hidden_states[-1][0] if self.want_hidden else None

    def staged_forward(self, width: int, span: int | None = None) -> Outputs:
        """The forward of the staged pass of ``width`` rows over every slot (or ``span``), all rows' logits.
        Reads only static buffers, so it can be captured (graphs hold this state, never a target)."""
        inputs, span = self.inputs, span or self.num_slots
        return self.forward(inputs.ids(width), inputs.positions(width), inputs.slots(width),
                            self.mask.buffer[:width, :span], 0)


class TransformersTarget:
    """One sequence on a transformers model: a static KV cache plus tree-masked scoring passes.

    A pass gets a float additive 4-D mask (right for sdpa and eager). For models with sliding-window layers,
    the tree mask cut to the window by the slots' positions goes to every layer (Mistral, Phi-3) or to the
    sliding layers alone (Gemma 3, Qwen2/3), so trees stay exact past the window. Returned ``Scores`` are fresh
    tensors (never views of graph buffers).
    """

    def __init__(self, backend: TransformersModel | PreTrainedModel, want_hidden: bool = False) -> None:
        if not isinstance(backend, TransformersModel):
            backend = TransformersModel(backend)
        self.backend = backend
        self.model = backend.model
        self.want_hidden = want_hidden
        self.vocab_size = backend.vocab_size
        self.max_context = backend.max_context
        self.device = backend.device
        self.dtype = backend.dtype
        spare = [s for s in backend._spare if s.want_hidden == want_hidden]
        self.state = spare[0] if spare else _SequenceState(backend, want_hidden)
        if spare:
            backend._spare.remove(self.state)
        weakref.finalize(self, backend._spare.append, self.state)
        self.cache = self.state.cache
        self.cache_len = 0
        self._pending = 0  # tokens appended by the last pass, not yet committed

    @torch.inference_mode()
    def start(self, context: list[int]) -> Scores:
        self.cache_len = self.cache.length = 0
        self._pending = 0
        self.state.mask.reset()
        if not context:
            return Scores(torch.empty(0, self.vocab_size, device=self.device))
        if len(context) >= self.max_context:
            raise HastenError(f"the sequence would exceed the model's context of {self.max_context} tokens")
        n = len(context)
        span = self.state.num_slots if self.backend.static_span else n
        closed = torch.finfo(self.dtype).min
        mask = torch.full((n, span), closed, dtype=self.dtype, device=self.device)
        mask[:, :n] = torch.where(causal_block(n, self.device), 0.0, closed).to(self.dtype)
        arange = torch.arange(n, device=self.device)
        logits, hidden = self.state.forward(torch.tensor([context], device=self.device), arange[None], arange, mask, 1)
        self.cache_len = self.cache.length = n
        return Scores(logits.float(), hidden[-1:] if hidden is not None else None)

    def _width(self, n: int) -> int:
        """The padded width of a pass over ``n`` tokens (``n`` itself without padding or near the end)."""
        minimum = self.backend.pass_width
        if minimum is None:
            return n
        width = max(minimum, 1 << (n - 1).bit_length())
        return width if self.cache_len + width <= self.state.num_slots else n

    def _run(self, width: int) -> Outputs:
        """The forward of a staged padded pass: a graph replay where graphs are on, else eager."""
        state = self.state
        if not (self.backend.graphs and width <= MAX_GRAPH_WIDTH):
            return state.staged_forward(width, None if self.backend.static_span else self.cache_len + width)
        layout = (state.mask.generation, state.inputs.generation)
        if state.runner is None or state.layout != layout:
            state.runner, state.layout = GraphRunner(state.staged_forward, self.device), layout
        return state.runner.run(width)

    @torch.inference_mode()
    def score(self, tokens: list[int], parents: list[int], logits_rows: Sequence[int] | None = None) -> Scores:
        if self._pending:
            raise RuntimeError("commit() the previous pass before scoring again")
        if len(tokens) != len(parents) or not tokens:
            raise ValueError("a pass needs one parent per token and at least the root")
        if self.cache_len + len(tokens) > self.max_context:  # one cache slot per token, whatever the tree's depth
            raise HastenError(f"a pass of {len(tokens)} tokens after {self.cache_len} cached ones would exceed the "
                              f"model's context of {self.max_context} tokens")
        depths = depths_of(parents)
        n, start = len(tokens), self.cache_len
        width = self._width(n)
        pad = width - n
        state, inputs = self.state, self.state.inputs
        padded = self.backend.pass_width is not None
        rows = list(range(n)) if logits_rows is None else list(logits_rows)
        inputs.stage(list(tokens) + [0] * pad, [start + d for d in depths] + [start] * pad,
                     range(start, start + width), padded_ancestor_mask(parents, width), rows)
        window = self.backend.sliding_window is not None
        state.mask.update(start, inputs.block(width), inputs.positions(width)[0] if window else None)
        span = state.num_slots if self.backend.static_span else start + width
        if padded:  # every row through the output head: one kernel shape for every pass
            logits, hidden = self._run(width)
            picked = inputs.rows(len(rows))
            logits = logits.index_select(0, picked)
            hidden = hidden.index_select(0, picked) if hidden is not None else None
        else:  # the output head only for the rows read, as plain decoding does
            keep = 0 if logits_rows is None else inputs.rows(len(rows))
            logits, hidden = state.forward(inputs.ids(width), inputs.positions(width), inputs.slots(width),
                                           state.mask.buffer[:width, :span], keep)
            if hidden is not None and logits_rows is not None:
                hidden = hidden.index_select(0, inputs.rows(len(rows)))
        self._pending = n
        return Scores(logits.float(), hidden)

    @torch.inference_mode()
    def commit(self, keep: list[int]) -> None:
        self._pending = 0
        moved = [(self.cache_len + k, self.cache_len + i) for i, k in enumerate(keep) if k != i]
        if moved:  # a path that is not a prefix: move only the accepted rows, in every layer at once
            source, destination = self.state.inputs.stage_moves(*zip(*moved, strict=True))
            self.cache.move(source, destination)
        self.cache_len += len(keep)
        self.cache.length = self.cache_len

    def truncate(self, length: int) -> None:
        if self._pending:
            raise RuntimeError("commit() the previous pass before truncating")
        if length < self.cache_len:
            self.cache_len = self.cache.length = length

    def cached_length(self) -> int:
        """The cache's own committed length (equals ``cache_len`` between passes)."""
        return int(self.cache.get_seq_length())
