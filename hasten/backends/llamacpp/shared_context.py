"""Several llama.cpp targets scored in one ``llama_decode``: a shared context, each target its own sequence ids.

Layout. A model has one shared context (created on first use) whose unified KV cache holds the committed
context of every member target under the target's *home* sequence id; a tree pass borrows more ids (one per
leaf, lazily caught up from the home, as in a target's own context) from the context's pool of
``shared_seq_max`` ids (llama.cpp's most, 256, by default). Id 0 is the garbage sequence, which no token ever
attends to.

Exactness. ggml's CPU flash attention kernel (``ggml_compute_forward_flash_attn_ext_f16_one_chunk``) treats
every query row on its own and walks the KV cells in cell order, skipping masked ones outright; with quantized
weights the matmuls are batch-invariant under 64 tokens. So a row's logits are bit-identical to scoring its
sequence alone as long as its own cells appear in the same order, whatever other targets' cells lie between
them. Each target's cells must therefore stay in position order across the cell array, which llama.cpp's cell
placement does not promise: a new token goes to the first free cell after the cache's head, and freeing a cell
moves the head back to it, so a hole between two targets' cells would later take a token of a target whose own
cells lie after it. Hence the cache here never gets a hole: cells a target no longer needs (rejected drafts, a
truncation, a target leaving) move to the garbage sequence instead of being freed, so every new cell goes at the
end; when the garbage outweighs the live cells or the end comes near, the cache is compacted (every member's
cells copied out and back, each target contiguous and in order; K/V bytes, nothing recomputed).

Which passes can be exact here, and which run in the target's own context, is ``shared_exactness``.
"""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from hasten.backends.base import Scores
from hasten.backends.llamacpp.batch import BatchArrays, LiveRows
from hasten.backends.llamacpp.interfaces import Membership, TargetModel
from hasten.backends.llamacpp.kv_inspection import caught_up_problems, kv_cells, layout_problems
from hasten.backends.llamacpp.shared_exactness import MAX_TOKENS, Attention, lone_token_splits, shareable
from hasten.backends.llamacpp.target import LlamaCppTarget
from hasten.backends.llamacpp.tree_layout import PassPlan, check_kept_path, kept_path_sequence
from hasten.errors import HastenError

GARBAGE = 0  # the sequence of cells no target needs any more (never attended to; freeing them would leave holes)
MIN_GARBAGE = 256  # compact once the garbage exceeds this and the live cells

Pass = tuple[LlamaCppTarget, list[int], list[int], Sequence[int] | None]  # target, tokens, parents, rows


class SharingModel(TargetModel, Attention, Protocol):
    """What the shared context uses of its model (``model.LlamaCppModel``, which imports this module)."""

    shared_seq_max: int

    def new_context(self, n_ctx: int | None = None, n_seq_max: int | None = None) -> Any: ...

    def acquire_context(self) -> Any: ...

    def shared_cache(self) -> SharedCache: ...

    @property
    def shared_cache_if_made(self) -> SharedCache | None: ...


def score_many(model: SharingModel, passes: Sequence[Pass]) -> list[Scores]:
    """Score the passes of distinct, open targets of ``model`` (``LlamaCppModel.score_many`` checks that): those
    that can be exact there in shared decodes (two or more of them), the rest each in its own context; results
    in the order given."""
    plans = [target.plan(tokens, parents, rows) for target, tokens, parents, rows in passes]
    share = [i for i, (target, tokens, *_) in enumerate(passes) if shareable(model, target.cache_len, len(tokens))]
    if len(share) == 1 and passes[share[0]][0].membership is None:
        share = []  # alone it runs as fast in its own context, without the copy in
    cache = model.shared_cache() if share else model.shared_cache_if_made
    results: list[Scores | None] = [None] * len(passes)
    if cache is not None:
        share = [i for i in share if cache.holds(passes[i][0]) or cache.join(passes[i][0])]
        results = cache.decode(passes, plans, share, results)
    for i, (target, tokens, parents, rows) in enumerate(passes):
        if results[i] is None:
            if target.membership is not None:
                target.membership.cache.leave(target)
            results[i] = target.score(tokens, parents, rows)
    return [scores for scores in results if scores is not None]


class SharedCache:
    """The llama context of one model in which member targets keep their caches and are scored together.

    The model owns it (``LlamaCppModel.shared_cache``) and frees it (``close``) before the llama model itself; it
    keeps only a weak proxy of the model, so the two hold no reference cycle and a dropped model is freed at once.
    """

    def __init__(self, model: SharingModel, cells: int) -> None:
        self.model: SharingModel = weakref.proxy(model)
        self._lib = lib = model.lib
        self.n_seq = model.shared_seq_max
        self.ctx = model.new_context(n_ctx=cells, n_seq_max=self.n_seq)
        self.mem = lib.llama_get_memory(self.ctx)
        self.size = int(lib.llama_n_ctx(self.ctx))
        self.free_ids = list(range(self.n_seq - 1, GARBAGE, -1))  # popped from the end: 1 first
        self.members: weakref.WeakValueDictionary[int, LlamaCppTarget] = weakref.WeakValueDictionary()
        self.end = 0  # cells in use; there are no holes, so llama.cpp places the next cell at index ``end``
        self.garbage = 0  # of those, cells only in the garbage sequence
        self.embeddings = False
        lib.llama_set_embeddings(self.ctx, False)
        self.arrays = BatchArrays(lib, MAX_TOKENS, self.n_seq)
        self._batch = self.arrays.batch_at(0)
        self._buffer = (ctypes.c_uint8 * 0)()
        self.outputs = LiveRows()  # members' logits rows, read on demand until the next decode copies held ones

    def close(self) -> None:
        """Free the llama context (its model frees it first, before the llama model); members can only leave."""
        context, self.ctx, self.mem = self.ctx, None, None
        if context:
            self.outputs.detach()
            self._lib.llama_free(context)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    # -- members coming and going

    def holds(self, target: LlamaCppTarget) -> bool:
        """Whether ``target`` is a member (its cache lives here)."""
        return target.membership is not None and target.membership.cache is self

    def join(self, target: LlamaCppTarget) -> bool:
        """Move a target's cache (from its own context) in; False when there is no room or no id for it."""
        length = target.cache_len
        if self.end + length > self.size:
            self.compact()
        if not self.free_ids:
            self._reclaim(set())
        if self.end + length > self.size or not self.free_ids:
            return False
        home = self.free_ids.pop()
        self._copy(target.own_context, 0, self.ctx, home)
        self.end += length
        target.moved_in(Membership(self, [home], [length]))
        self.members[home] = target
        return True

    def leave(self, target: LlamaCppTarget, keep: bool = True, reopen: bool = True) -> None:
        """Move a target back to a context of its own, its cache copied there (``keep``) or dropped; its cells
        here become garbage and its ids go back to the pool. ``reopen=False``: the target is closing."""
        ids = _seat(target).ids
        if self.ctx is None:  # freed with its model: a closing target just lets go
            if keep or reopen:
                raise RuntimeError("the model's shared context was freed")
            self.members.pop(ids[0], None)
            target.moved_out(None, kept=False)
            return
        context = None
        if keep:
            if target.pending is not None:
                raise RuntimeError("commit() the previous pass before the target leaves the shared context")
            context = self.model.acquire_context()
            self._copy(self.ctx, ids[0], context, 0)
        self.garbage += target.cache_len + (len(target.pending[0]) if target.pending else 0)
        for s in ids:
            self._lib.llama_memory_seq_cp(self.mem, s, GARBAGE, -1, -1)
        for s in ids:
            self._drop_cells(s, -1)
        self.members.pop(ids[0], None)
        self.free_ids += ids[::-1]
        if reopen and context is None:
            context = self.model.acquire_context()
        target.moved_out(context if reopen else None, kept=keep)
        if not self.members:  # nothing live: start over, for free
            self._lib.llama_memory_clear(self.mem, True)
            self.end = self.garbage = 0

    def compact(self) -> None:
        """Drop the garbage: every member's cells copied out and back in, each member contiguous, in order
        (not while a member's pass is pending: its pass cells are in borrowed ids)."""
        members = list(self.members.values())
        if any(target.pending is not None for target in members):
            return
        lib = self._lib
        saved = []
        for target in members:
            home = _seat(target).ids[0]
            size = lib.llama_state_seq_get_size(self.ctx, home)
            data = (ctypes.c_uint8 * size)()
            lib.llama_state_seq_get_data(self.ctx, data, size, home)
            saved.append(data)
        lib.llama_memory_clear(self.mem, True)
        self.end = self.garbage = 0
        for target, data in zip(members, saved, strict=True):
            seat = _seat(target)
            if lib.llama_state_seq_set_data(self.ctx, data, len(data), seat.ids[0]) != len(data):
                raise HastenError("llama.cpp could not move cache entries in the shared context")
            self.end += target.cache_len
            self.free_ids += seat.ids[:0:-1]
            seat.ids, seat.synced = seat.ids[:1], [target.cache_len]

    def _reclaim(self, busy: set[int]) -> None:
        """Give the borrowed ids of members that are neither ``busy`` nor mid-pass back to the pool (their cells
        are all in the member's home, so this frees none)."""
        for target in list(self.members.values()):
            seat = _seat(target)
            if id(target) not in busy and target.pending is None and len(seat.ids) > 1:
                for s in seat.ids[1:]:
                    self._drop_cells(s, -1)
                self.free_ids += seat.ids[:0:-1]
                seat.ids, seat.synced = seat.ids[:1], seat.synced[:1]

    # -- scoring

    def score(self, target: LlamaCppTarget, tokens: list[int], parents: list[int],
              logits_rows: Sequence[int] | None) -> Scores:
        """Score a member's pass: here when it can be exact here, otherwise after it left for its own context."""
        return score_many(self.model, [(target, tokens, parents, logits_rows)])[0]

    def decode(self, passes: Sequence[Pass], plans: Sequence[PassPlan], share: Sequence[int],
               results: list[Scores | None]) -> list[Scores | None]:
        """Score the passes ``share`` (of members) in decodes of at most MAX_TOKENS tokens; fills ``results``."""
        if not share:
            return results
        need = sum(len(passes[i][1]) for i in share)
        if self.end + need > self.size or self.garbage > max(MIN_GARBAGE, self.end - self.garbage):
            self.compact()
        if self.end + need > self.size:  # no room for all: the overflow runs in the targets' own contexts
            room, fits = self.size - self.end, []
            for i in share:
                if len(passes[i][1]) <= room:
                    fits.append(i)
                    room -= len(passes[i][1])
            share = fits
        chunk: list[int] = []
        busy: set[int] = set()
        width = 0
        for i in share:
            target, tokens = passes[i][0], passes[i][1]
            n_seqs = plans[i].n_sequences
            if chunk and (width + len(tokens) > MAX_TOKENS or not self._ids_for(target, n_seqs, busy, False)):
                self._decode_chunk(passes, plans, chunk, results)
                chunk, busy, width = [], set(), 0
            busy.add(id(target))
            if self._ids_for(target, n_seqs, busy, True):
                chunk.append(i)
                width += len(tokens)
        if chunk:
            self._decode_chunk(passes, plans, chunk, results)
        return results

    def _ids_for(self, target: LlamaCppTarget, n_seqs: int, busy: set[int], take: bool) -> bool:
        """Whether ``target`` has (``take``: gets) an id for each of ``n_seqs`` sequences, reclaiming borrowed
        ids from members not ``busy`` when the pool runs short."""
        seat = _seat(target)
        missing = n_seqs - len(seat.ids)
        if missing > len(self.free_ids):
            self._reclaim(busy | {id(target)})
        if missing > len(self.free_ids):
            return False
        if take:
            for _ in range(max(0, missing)):
                seat.ids.append(self.free_ids.pop())
                seat.synced.append(0)
        return True

    def _decode_chunk(self, passes: Sequence[Pass], plans: Sequence[PassPlan], chunk: list[int],
                      results: list[Scores | None]) -> None:
        """Score the passes ``chunk`` in one llama_decode, unless a lone token would take the split-KV path."""
        lib = self._lib
        width = sum(len(passes[i][1]) for i in chunk)
        if width == 1 and lone_token_splits(self.model, self.end):
            return  # a lone token here would take the split-KV path over shared cells: its own context scores it
        embeddings = any(passes[i][0].want_hidden for i in chunk)
        if embeddings != self.embeddings:
            lib.llama_set_embeddings(self.ctx, embeddings)
            self.embeddings = embeddings
        offset = 0
        self.arrays.out[:width] = 1 if embeddings else 0
        for i in chunk:
            self._fill(passes[i][0], passes[i][1], plans[i], offset, embeddings)
            offset += len(passes[i][1])
        self._batch.n_tokens = width
        self.outputs.detach()
        rc = lib.llama_decode(self.ctx, self._batch)
        if rc != 0:
            raise HastenError(f"llama_decode failed ({rc}) in the shared context")
        self.end += width
        self._collect(passes, plans, chunk, width, embeddings, results)

    def _fill(self, target: LlamaCppTarget, tokens: list[int], plan: PassPlan, offset: int,
              embeddings: bool) -> None:
        """Write a member's pass into the batch from ``offset`` on, under the member's sequence ids."""
        a, ids = self.arrays, _seat(target).ids
        n = len(tokens)
        end = offset + n
        a.tok[offset:end] = tokens
        if plan.sequences is None:
            a.pos[offset:end] = a.arange[:n] + target.cache_len
            a.nseq[offset:end] = 1
            a.seq[offset:end, 0] = ids[0]
        else:
            self._catch_up(target, plan.n_sequences)
            a.pos[offset:end] = plan.depths
            a.pos[offset:end] += target.cache_len
            id_array = np.asarray(ids, dtype=np.int32)
            for t, leaves in enumerate(plan.sequences):
                a.nseq[offset + t] = len(leaves)
                a.seq[offset + t, : len(leaves)] = id_array[leaves]
        if not embeddings:
            a.out[np.asarray(plan.rows, dtype=np.int64) + offset] = 1

    def _catch_up(self, target: LlamaCppTarget, n_seqs: int) -> None:
        """Make the member's borrowed ids 1..n_seqs-1 carry its committed context (tags only)."""
        seat = _seat(target)
        for j in range(1, n_seqs):
            if seat.synced[j] < target.cache_len:
                self._lib.llama_memory_seq_cp(self.mem, seat.ids[0], seat.ids[j], seat.synced[j], -1)
                seat.synced[j] = target.cache_len

    def _collect(self, passes: Sequence[Pass], plans: Sequence[PassPlan], chunk: list[int], width: int,
                 embeddings: bool, results: list[Scores | None]) -> None:
        """Pick each pass's rows out of the decode's outputs into ``results``; the passes become pending."""
        lib, model = self._lib, self.model
        index = np.arange(width) if embeddings else np.cumsum(self.arrays.out[:width], dtype=np.int64) - 1
        n_out = width if embeddings else int(index[-1]) + 1
        pointer = lib.llama_get_logits(self.ctx) if n_out else None
        hidden = self._view(lib.llama_get_embeddings(self.ctx), n_out, model.hidden_size) if embeddings else None
        offset = 0
        for i in chunk:
            target, tokens, parents, _ = passes[i]
            plan = plans[i]
            picked = index[np.asarray(plan.rows, dtype=np.int64) + offset]
            logits = self.outputs.hand_out(pointer, n_out, model.vocab_size, picked.tolist()) if n_out else \
                torch.zeros(0, model.vocab_size)
            results[i] = Scores(logits,
                                torch.from_numpy(hidden[picked]) if hidden is not None and target.want_hidden
                                else None)
            target.pending = (list(parents), plan.sequences)
            offset += len(tokens)

    @staticmethod
    def _view(pointer: Any, rows: int, width: int) -> np.ndarray:
        if not pointer:
            raise HastenError("llama.cpp returned no outputs for the pass")
        return np.ctypeslib.as_array(pointer, shape=(rows, width))

    # -- a member's cache

    def commit(self, target: LlamaCppTarget, keep: list[int]) -> None:
        """Keep the path ``keep`` of the member's last pass in its home; every other cell of the pass becomes
        garbage (tagged first, so untagging frees nothing)."""
        if target.pending is None:
            raise RuntimeError("commit() needs a scored pass")
        parents, seqs = target.pending
        check_kept_path(parents, keep)
        seat = _seat(target)
        lib, mem, ids = self._lib, self.mem, seat.ids
        old = target.cache_len
        new = old + len(keep)
        if seqs is None:
            lib.llama_memory_seq_cp(mem, ids[0], GARBAGE, new, -1)
            self._drop_cells(ids[0], new)
        else:
            n_seqs = seqs[0][-1] + 1  # the root carries every sequence of the pass
            holder = kept_path_sequence(seqs, keep)
            on_path = [0] * n_seqs  # how many kept tokens each sequence holds
            for node in keep:
                for j in seqs[node]:
                    on_path[j] += 1
            cuts = [new if j == holder else old + on_path[j] for j in range(n_seqs)]
            for j in range(n_seqs):  # from its cut on, a sequence holds only tokens that were not kept
                lib.llama_memory_seq_cp(mem, ids[j], GARBAGE, cuts[j], -1)
            for j in range(n_seqs):
                self._drop_cells(ids[j], cuts[j])
            if holder != 0:
                lib.llama_memory_seq_cp(mem, ids[holder], ids[0], cuts[0], new)
            for j in range(1, n_seqs):
                seat.synced[j] = cuts[j]
        self.garbage += len(parents) - len(keep)
        target.cache_len = seat.synced[0] = new
        target.pending = None

    def truncate(self, target: LlamaCppTarget, length: int) -> None:
        """Drop a member's cache entries from ``length`` on (they become garbage)."""
        if target.pending is not None:
            raise RuntimeError("commit() the previous pass before truncating")
        if not 0 <= length <= target.cache_len:
            raise ValueError(f"cannot truncate a cache of {target.cache_len} tokens to {length}")
        seat = _seat(target)
        self._lib.llama_memory_seq_cp(self.mem, seat.ids[0], GARBAGE, length, -1)
        for s in seat.ids:
            self._drop_cells(s, length)
        self.garbage += target.cache_len - length
        target.cache_len = length
        seat.synced = [min(synced, length) for synced in seat.synced]

    def problems(self, target: LlamaCppTarget) -> list[str]:
        """``cache_problems`` for a member: its home holds exactly its committed positions, in order; its borrowed
        ids are caught up as recorded; the whole cache holds ``end`` cells, ``garbage`` of them garbage only."""
        lib, problems, seat = self._lib, [], _seat(target)
        if target.pending is not None:
            problems.append("a pass is pending (not committed)")
        home = seat.ids[0]
        if target.real_cache_len() != target.cache_len:
            problems.append(f"sequence {home} ends at {target.real_cache_len()}, cache_len is {target.cache_len}")
        problems += layout_problems(kv_cells(lib, self.ctx, home), target.cache_len, home)
        problems += caught_up_problems(lib, self.mem, seat.ids[1:], seat.synced[1:])
        cells = kv_cells(lib, self.ctx, -1)
        garbage = sum(ids == (GARBAGE,) for _, ids in cells)
        if len(cells) != self.end or garbage != self.garbage:
            problems.append(f"the shared cache holds {len(cells)} cells ({garbage} garbage), "
                            f"expected {self.end} ({self.garbage})")
        if any(GARBAGE in ids and len(ids) > 1 for _, ids in cells):
            problems.append("live cells are tagged as garbage")
        return problems

    # -- helpers

    def _drop_cells(self, seq: int, start: int) -> None:
        """Drop sequence ``seq``'s cells from position ``start`` on."""
        if not self._lib.llama_memory_seq_rm(self.mem, seq, start, -1):
            raise HastenError(f"llama.cpp could not drop cache entries from position {start}")

    def _copy(self, source: Any, source_seq: int, dest: Any, dest_seq: int) -> None:
        """Copy one sequence's cells (positions and K/V) from one context into another's sequence."""
        lib = self._lib
        size = lib.llama_state_seq_get_size(source, source_seq)
        if len(self._buffer) < size:
            self._buffer = (ctypes.c_uint8 * max(size, 2 * len(self._buffer)))()
        lib.llama_state_seq_get_data(source, self._buffer, size, source_seq)
        if lib.llama_state_seq_set_data(dest, self._buffer, size, dest_seq) != size:
            raise HastenError("llama.cpp could not move a cache between contexts")


def _seat(target: LlamaCppTarget) -> Membership[LlamaCppTarget]:
    """A member's place in the shared context."""
    if target.membership is None:
        raise RuntimeError("this target's cache is not in the shared context")
    return target.membership


__all__ = ["SharedCache", "SharingModel", "score_many"]
