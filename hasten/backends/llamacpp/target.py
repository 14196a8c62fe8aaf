"""A llama.cpp target: one sequence whose llama context holds exactly its committed tokens in its KV cache.

A pass lays its tree out with one sequence id per leaf (``tree_layout``). The committed context must be
visible in every sequence of the pass; with ``kv_unified`` this only tags cells, and the tags are kept lazily
(a sequence is caught up from sequence 0 when a pass first needs it), so a step costs a few scans of the cell
array and never work proportional to the context. After ``commit`` exactly the committed cells remain, all in
sequence 0; nothing is ever evaluated twice.

``LlamaCppModel.score_many`` scores several targets' passes in one ``llama_decode``: their caches then live in
one shared context, each under its own sequence ids (``shared_context``; ``shared_exactness``
says which passes can be bit-identical there and which run in the target's own context). A target used on its
own never leaves its own context.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Sequence
from typing import Any

import torch

from hasten.backends.base import Scores
from hasten.backends.llamacpp.batch import BatchArrays, LiveRows, OutputRows, copy_rows
from hasten.backends.llamacpp.interfaces import Membership, TargetModel
from hasten.backends.llamacpp.kv_inspection import Cell, caught_up_problems, kv_cells, layout_problems, sequence_end
from hasten.backends.llamacpp.library import clear_log, first_logged_error
from hasten.backends.llamacpp.tree_layout import PassPlan, check_kept_path, kept_path_sequence, plan_pass
from hasten.errors import HastenError


class LlamaCppTarget:
    """One sequence on a llama.cpp model: a llama context whose KV cache holds exactly the committed tokens."""

    def __init__(self, model: TargetModel, context: Any, want_hidden: bool = False) -> None:
        self.model = model
        self.want_hidden = want_hidden
        self.vocab_size = model.vocab_size
        self.hidden_size = model.hidden_size
        self.max_context = model.max_context
        self.cache_len = 0
        self._lib = lib = model.lib
        self._outputs = LiveRows()  # the logits rows of the last pass, read on demand out of llama.cpp's buffer
        self._ctx = context  # this target's own llama context (None while it lives in the shared one)
        self._mem = lib.llama_get_memory(context)  # and that context's KV memory
        lib.llama_set_embeddings(context, want_hidden)
        self._n_seq_max = model.n_seq_max
        self._n_batch = model.n_batch
        # _synced[s]: sequence s carries the committed positions [0, _synced[s]); sequence 0 always all of them.
        self._synced = [0] * self._n_seq_max
        # the last pass, scored and not yet committed: (parents, each token's sequence ids or None for a chain)
        self.pending: tuple[list[int], list[list[int]] | None] | None = None
        self._capacity = 0
        self._grow(max(64, self._n_batch))
        self._move_buffer = (ctypes.c_uint8 * 0)()  # scratch for moving kept cells
        # set while the cache lives in the model's shared context
        self.membership: Membership[LlamaCppTarget] | None = None

    # -- the Target protocol

    def start(self, context: list[int]) -> Scores:
        """Clear the cache and prefill ``context`` (what the model's prompt cache holds of it is restored, not
        run); scores for its last position.

        A target that wants hidden states prefills in the batches a plain target uses, so its logits are plain
        decoding's bits: with embeddings off and the hidden state from a pass on the side (``_last_hidden``),
        or, where that has no free cell or sequence (or one token is left to run), with embeddings on, where
        llama.cpp computes every row but the last row's logits are still the same bits."""
        if self.membership is not None:  # a prefill runs in a context of its own, as plain decoding runs it
            self.membership.cache.leave(self, keep=False)
        self.check_open()
        self._lib.llama_memory_clear(self._mem, False)  # the cells, not their bytes (model.release_context)
        self.cache_len = 0
        self._synced = [0] * self._n_seq_max
        self.pending = None
        n = len(context)
        if n > self.max_context:
            raise HastenError(f"the context of {n} tokens exceeds the model's context of {self.max_context}")
        if n == 0:
            hidden = torch.empty(0, self.hidden_size) if self.want_hidden else None
            return Scores(torch.empty(0, self.vocab_size), hidden)
        cache = self.model.prompt_cache
        self.cache_len = cache.restore(self._ctx, context) if cache is not None else 0
        rest = context[self.cache_len:]
        side = self.want_hidden and len(rest) > 1 and n < self.max_context and self._n_seq_max > 1
        if side:  # the prefill as a plain target runs it, then the last position's hidden state on the side
            logits = self._prefill_without_embeddings(rest)
            hidden = self._last_hidden(context[-1], n - 1)
        else:  # one batch (with embeddings on, every row computed: the last row's logits are the same bits)
            self._fill_chain(rest, [len(rest) - 1])
            logits, hidden = self._decode(len(rest), [len(rest) - 1])
        self.cache_len = self._synced[0] = n
        if cache is not None:
            cache.store(self._ctx, context)
        return Scores(logits, hidden)

    def _prefill_without_embeddings(self, tokens: list[int]) -> OutputRows:
        """Run a chain into the cache exactly as a target without hidden states runs it (the same batches, one
        output row), so its last row's logits are plain decoding's bits; with embeddings on, llama.cpp would
        compute the logits of every row. The logits of the last row."""
        lib = self._lib
        lib.llama_set_embeddings(self._ctx, False)
        self.want_hidden = False
        try:
            self._fill_chain(tokens, [len(tokens) - 1])
            logits, _ = self._decode(len(tokens), [len(tokens) - 1])
        finally:
            self.want_hidden = True
            lib.llama_set_embeddings(self._ctx, True)
        return logits

    def _last_hidden(self, token: int, position: int) -> torch.Tensor:
        """The hidden state of ``token`` at ``position`` (the last one of the prefill, already in the cache),
        from a one-token pass in the scratch sequence, which sees the cells before it and is dropped afterwards:
        the cache keeps the prefill's own cells. Needs one free cell. The row comes from another pass than the
        prefill's, so it can differ from it in the last bits (past 64 cached tokens with an F16 cache); it only
        steers drafts, while the logits are the prefill's."""
        scratch = self._n_seq_max - 1  # never used by a pass
        self._lib.llama_memory_seq_cp(self._mem, 0, scratch, 0, position)
        self._tok[0], self._pos[0], self._nseq[0], self._seq[0, 0], self._out[0] = token, position, 1, scratch, 1
        try:
            _, hidden = self._decode(1, [0])
        finally:
            self._drop_cells(scratch, 0)
        assert hidden is not None
        return hidden

    def score(self, tokens: list[int], parents: list[int], logits_rows: Sequence[int] | None = None) -> Scores:
        """Score a tree below the cache (token 0 the root); logits (and hidden states) for ``logits_rows``."""
        if self.membership is not None:
            return self.membership.cache.score(self, tokens, parents, logits_rows)
        self.check_open()
        plan = self.plan(tokens, parents, logits_rows)
        rows, n = plan.rows, len(tokens)
        if plan.sequences is None:
            self._fill_chain(tokens, rows)
        else:
            if plan.n_sequences >= self._n_seq_max:
                raise HastenError(f"a tree with {plan.n_sequences} leaves needs n_seq_max > {plan.n_sequences}; "
                                  f"this model has n_seq_max={self._n_seq_max}")
            assert plan.depths is not None
            self._catch_up(plan.n_sequences)
            self._fill_tree(tokens, plan.depths, plan.sequences, rows)
        ascending = logits_rows is None or all(b > a for a, b in zip(rows, rows[1:], strict=False))
        wanted = rows if ascending else sorted(set(rows))
        logits, hidden = self._decode(n, wanted)
        self.pending = (list(parents), plan.sequences)
        if not ascending:  # llama.cpp returns rows in batch order, once each: reorder (and repeat) them as asked
            rank = {row: j for j, row in enumerate(wanted)}
            index = [rank[row] for row in rows]
            logits.pick(index)
            hidden = None if hidden is None else hidden[index]
        return Scores(logits, hidden)

    def plan(self, tokens: list[int], parents: list[int], logits_rows: Sequence[int] | None) -> PassPlan:
        """Validate a pass against this target (no pass pending, room in the context) and lay it out."""
        if self.pending is not None:
            raise RuntimeError("commit() the previous pass before scoring again")
        plan = plan_pass(tokens, parents, logits_rows)
        if self.cache_len + len(tokens) > self.max_context:  # one cell per token, however shallow the tree
            raise HastenError(f"a pass of {len(tokens)} tokens after {self.cache_len} cached ones would exceed "
                              f"the model's context of {self.max_context} tokens")
        return plan

    def commit(self, keep: list[int]) -> None:
        """Keep the root-down path ``keep`` of the last pass in sequence 0 and drop everything else it added.

        When the kept tokens are not the first ones of the pass, their cells are moved (llama.cpp's sequence
        state copy: K/V rows of just those cells) to the slots right after the context, so the cache is laid
        out exactly as plain decoding lays it out: attention then sums over the cells in the same order, and
        later scores are bit-identical to decoding the committed tokens one by one wherever llama.cpp's
        passes are batch-invariant (flash attention on, quantized weights, passes under 64 tokens).
        """
        if self.membership is not None:
            self.membership.cache.commit(self, keep)
            return
        self.check_open()
        if self.pending is None:
            raise RuntimeError("commit() needs a scored pass")
        parents, seqs = self.pending
        check_kept_path(parents, keep)
        old = self.cache_len
        new = old + len(keep)
        holder = 0  # a sequence other than 0 that holds the whole new context afterwards
        if seqs is None:
            self._drop_cells(0, new)
        elif all(node == i for i, node in enumerate(keep)):  # the kept cells are the pass's first: no move
            holder = self._keep_leading_cells(seqs, keep, old, new)
        else:
            self._move_kept_cells(seqs, keep, old, new)
        for s in range(1, self._n_seq_max):  # the other sequences hold the context up to at most old
            if self._synced[s] > old:
                self._synced[s] = old
        if holder:
            self._synced[holder] = new
        self._synced[0] = new
        self.cache_len = new
        self.pending = None

    def _keep_leading_cells(self, seqs: list[list[int]], keep: list[int], old: int, new: int) -> int:
        """Commit a kept path that is the pass's first tokens, where its cells already lie: every sequence but
        the one holding the path drops the pass, and sequence 0 takes the path from it. Returns that sequence."""
        holder = kept_path_sequence(seqs, keep)
        for s in range(seqs[0][-1] + 1):  # the root carries every sequence of the pass
            if s != holder:
                self._drop_cells(s, old)
        self._drop_cells(holder, new)
        if holder != 0:
            self._lib.llama_memory_seq_cp(self._mem, holder, 0, old, new)
        return holder

    def _move_kept_cells(self, seqs: list[list[int]], keep: list[int], old: int, new: int) -> None:
        """Commit a kept path whose cells are scattered through the pass: copy them out (through a scratch
        sequence no pass uses), drop the whole pass, and copy them back in, right after the context."""
        lib, mem = self._lib, self._mem
        scratch = self._n_seq_max - 1  # never used by a pass
        lib.llama_memory_seq_cp(mem, kept_path_sequence(seqs, keep), scratch, old, new)
        size = lib.llama_state_seq_get_size(self._ctx, scratch)
        if len(self._move_buffer) < size:
            self._move_buffer = (ctypes.c_uint8 * max(size, 2 * len(self._move_buffer)))()
        lib.llama_state_seq_get_data(self._ctx, self._move_buffer, size, scratch)
        self._drop_cells(-1, old)  # every cell of the pass, in every sequence
        if lib.llama_state_seq_set_data(self._ctx, self._move_buffer, size, scratch) != size:
            raise HastenError("llama.cpp could not move the kept cache entries")
        lib.llama_memory_seq_cp(mem, scratch, 0, -1, -1)
        self._drop_cells(scratch, 0)

    def truncate(self, length: int) -> None:
        """Drop the cache entries from ``length`` on (in every sequence)."""
        if self.membership is not None:
            self.membership.cache.truncate(self, length)
            return
        self.check_open()
        if self.pending is not None:
            raise RuntimeError("commit() the previous pass before truncating")
        if not 0 <= length <= self.cache_len:
            raise ValueError(f"cannot truncate a cache of {self.cache_len} tokens to {length}")
        self._drop_cells(-1, length)
        self.cache_len = length
        self._synced = [min(synced, length) for synced in self._synced]

    def remember(self, tokens: list[int]) -> None:
        """Offer the committed cells, which hold ``tokens`` (a finished conversation), to the model's prompt cache."""
        cache = self.model.prompt_cache
        if cache is None or self.pending is not None or len(tokens) != self.cache_len or not tokens:
            return
        if self.membership is not None:
            cache.store(self.membership.cache.ctx, tokens, self.membership.ids[0])
        elif self._ctx:
            cache.store(self._ctx, tokens)

    def close(self) -> None:
        """Give the llama context back to the model's pool; the target cannot be used afterwards."""
        membership = getattr(self, "membership", None)
        if membership is not None:
            membership.cache.leave(self, keep=False, reopen=False)
        context, self._ctx = getattr(self, "_ctx", None), None
        if context:
            self._outputs.detach()
            self.model.release_context(context)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def check_open(self) -> None:
        """Refuse to work on a closed target."""
        if not self._ctx and self.membership is None:
            raise RuntimeError("this target was closed")

    # -- moving between its own llama context and the model's shared one (``shared_context`` moves the cells)

    @property
    def own_context(self) -> Any:
        """This target's own llama context (None while its cache lives in the shared context)."""
        return self._ctx

    def moved_in(self, membership: Membership[LlamaCppTarget]) -> None:
        """Its cells were copied into the shared context: give its own context back to the model and live there."""
        self._outputs.detach()
        self.model.release_context(self._ctx)
        self._ctx = self._mem = None
        self.membership = membership

    def moved_out(self, context: Any, kept: bool) -> None:
        """It left the shared context: for ``context``, where its cells were copied (``kept``) or which is empty
        (its cache and pending pass dropped), or for nothing (None: it is closing)."""
        self.membership = None
        if context is None:
            return
        if not kept:
            self.cache_len = 0
            self.pending = None
        self._ctx, self._mem = context, self._lib.llama_get_memory(context)
        self._lib.llama_set_embeddings(context, self.want_hidden)
        self._synced = [0] * self._n_seq_max
        self._synced[0] = self.cache_len

    # -- the KV cache's sequences

    def _drop_cells(self, seq: int, start: int) -> None:
        """Drop sequence ``seq``'s cells (-1: every sequence's) from position ``start`` on."""
        if not self._lib.llama_memory_seq_rm(self._mem, seq, start, -1):
            raise HastenError(f"llama.cpp could not drop cache entries from position {start}")

    def _catch_up(self, n_seqs: int) -> None:
        """Make sequences 1..n_seqs-1 carry the whole committed context (tags only: kv_unified)."""
        for s in range(1, n_seqs):
            if self._synced[s] < self.cache_len:
                self._lib.llama_memory_seq_cp(self._mem, 0, s, self._synced[s], -1)
                self._synced[s] = self.cache_len

    # -- the batch: numpy arrays that a llama_batch points into, filled with vector operations

    def _grow(self, capacity: int) -> None:
        arrays = self._arrays = BatchArrays(self._lib, capacity, self._n_seq_max)
        self._capacity = capacity
        self._tok, self._pos, self._nseq, self._seq = arrays.tok, arrays.pos, arrays.nseq, arrays.seq
        self._out, self._arange = arrays.out, arrays.arange
        self._batch = self._batch_at(0)

    def _batch_at(self, start: int) -> Any:
        return self._arrays.batch_at(start)

    def _ensure_capacity(self, n: int) -> None:
        if n > self._capacity:
            self._grow(max(n, 2 * self._capacity))

    def _fill_chain(self, tokens: Sequence[int], rows: Sequence[int]) -> None:
        n = len(tokens)
        if n == 1:  # plain decoding's every pass: item writes (cheaper than numpy's slicing right after a decode)
            self._tok[0], self._pos[0], self._nseq[0], self._seq[0, 0] = tokens[0], self.cache_len, 1, 0
            self._out[0] = 1 if self.want_hidden or len(rows) else 0
            return
        self._ensure_capacity(n)
        self._tok[:n] = tokens
        self._pos[:n] = self._arange[:n] + self.cache_len
        self._nseq[:n] = 1
        self._seq[:n, 0] = 0
        self._flag_outputs(n, rows)

    def _fill_tree(self, tokens: Sequence[int], depths: Sequence[int], seqs: list[list[int]],
                   rows: Sequence[int]) -> None:
        n = len(tokens)
        self._ensure_capacity(n)
        self._tok[:n] = tokens
        self._pos[:n] = depths
        self._pos[:n] += self.cache_len
        seq = self._seq
        for i, ids in enumerate(seqs):
            self._nseq[i] = len(ids)
            seq[i, : len(ids)] = ids
        self._flag_outputs(n, rows)

    def _flag_outputs(self, n: int, rows: Sequence[int]) -> None:
        if self.want_hidden or (isinstance(rows, range) and rows == range(n)):
            self._out[:n] = 1
        else:
            self._out[:n] = 0
            self._out[list(rows)] = 1

    # -- decoding

    def _decode(self, n: int, wanted: Sequence[int]) -> tuple[OutputRows, torch.Tensor | None]:
        """Decode the n filled tokens in chunks of n_batch; (logits, hidden) of the ascending rows ``wanted``: the
        logits read on demand when one chunk holds them all."""
        logits: list[OutputRows] = []
        hidden: list[torch.Tensor] = []
        start = 0
        first = 0  # index into wanted of the first row at or after start
        while start < n:
            m = min(self._n_batch, n - start)
            self._decode_chunk(start, m)
            last = first
            while last < len(wanted) and wanted[last] < start + m:
                last += 1
            if last > first:
                self._collect_outputs(start, m, wanted[first:last], logits, hidden)
            first = last
            start += m
        if len(logits) == 1:
            return logits[0], (hidden[0] if self.want_hidden else None)
        out_h = (torch.cat(hidden) if hidden else torch.empty(0, self.hidden_size)) if self.want_hidden else None
        return OutputRows.joined(logits, self.vocab_size), out_h

    def _decode_chunk(self, start: int, m: int) -> None:
        """Run the ``m`` filled tokens from ``start`` on through llama_decode."""
        batch = self._batch if start == 0 else self._batch_at(start)
        batch.n_tokens = m
        self._outputs.detach()  # the rows of the last pass still held are copied before llama.cpp overwrites them
        clear_log()
        began = time.perf_counter()
        rc = self._lib.llama_decode(self._ctx, batch)
        if self.model.decode_log is not None:  # a script timing llama.cpp's share of a step
            self.model.decode_log.append((m, time.perf_counter() - began))
        if rc != 0:
            if rc == 1:
                raise HastenError(f"the llama.cpp KV cache ({self.max_context} cells) has no room for the pass")
            raise HastenError(f"llama_decode failed ({rc}): {first_logged_error('see llama.cpp')}")

    def _collect_outputs(self, start: int, m: int, wanted: Sequence[int], logits: list[OutputRows],
                         hidden: list[torch.Tensor]) -> None:
        """Append the rows ``wanted`` of the chunk of ``m`` tokens from ``start`` just decoded (the logits read on
        demand). With embeddings on, llama.cpp outputs every token (it overrides the flags), so rows are picked."""
        if self.want_hidden:  # every token of the chunk is an output row
            local: Sequence[int] = [row - start for row in wanted]
            total = m
        else:  # exactly the flagged rows are outputs, in order
            local, total = range(len(wanted)), len(wanted)
        logits.append(self._outputs.hand_out(self._lib.llama_get_logits(self._ctx), total, self.vocab_size, local))
        if self.want_hidden:
            hidden.append(copy_rows(self._lib.llama_get_embeddings(self._ctx), total, self.hidden_size, local))

    # -- inspection (tests, debugging): llama.cpp's real cache state (``kv_inspection``)

    def real_cache_len(self) -> int:
        """One past the last position llama.cpp holds in sequence 0 (in the shared context: in its home)."""
        if self.membership is not None:
            return sequence_end(self._lib, self.membership.cache.mem, self.membership.ids[0])
        return sequence_end(self._lib, self._mem, 0)

    def kv_cells(self, seq: int = -1) -> list[Cell]:
        """(position, sequence ids) of every used cell (or of sequence ``seq``'s cells), from llama.cpp's state
        serialisation; copies the cells' K/V data, so it is for tests and debugging only."""
        ctx = self._ctx
        if self.membership is not None:  # this target's sequences there (-1: all of its cells, its home's)
            ids = self.membership.ids
            ctx, seq = self.membership.cache.ctx, ids[0] if seq == -1 else ids[seq]
        return kv_cells(self._lib, ctx, seq)

    def cache_problems(self) -> list[str]:
        """Every way the real cache differs from "exactly positions 0..cache_len-1, each once, in this order,
        in sequence 0" (in the shared context: in its home sequence) (empty when all is well). Checks, never
        asserts."""
        if self.membership is not None:
            return self.membership.cache.problems(self)
        problems: list[str] = []
        if self.pending is not None:
            problems.append("a pass is pending (not committed)")
        if self.real_cache_len() != self.cache_len:
            problems.append(f"sequence 0 ends at {self.real_cache_len()}, cache_len is {self.cache_len}")
        problems += layout_problems(self.kv_cells(), self.cache_len, 0)
        return problems + caught_up_problems(self._lib, self._mem, range(1, self._n_seq_max), self._synced[1:])


__all__ = ["LlamaCppTarget"]
