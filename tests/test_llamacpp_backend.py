"""The llama.cpp backend: sequence-id layout, tree logits, batch invariance, KV bookkeeping, hidden states, errors.

What holds numerically (llama.cpp through llama-cpp-python 0.3.36, CPU, flash attention on as llama.cpp picks):
- Quantized weights (Q8_0, Q4_0; Q4_1 on the real model) are batch-invariant from 1 to 63 tokens per pass:
  a chain scored in one pass or one token at a time gives bit-identical logits (integer dot products, and
  flash attention handles each query row on its own). From 64 tokens on, tiled kernels take over (~0.3
  apart). F32 and F16 weights differ between a 1-token pass and a batch (1e-6 to 1e-2).
- A tree row is bit-identical to its path decoded as a chain (masked cells add exact zeros), and because
  ``commit`` moves kept cells into plain decoding's slots, the cache layout, and so every later score, stays
  bit-identical to decoding the committed tokens as chains. Two exceptions, both llama.cpp's: passes of 64+
  tokens (prefill), and, with more than one thread, a 1-token pass once the cache holds more than 256 cells
  (flash attention then splits the cells across threads). The tiny models here run on one thread.
"""

from __future__ import annotations

import functools
import random
from typing import Any

import numpy as np
import pytest
import torch
from tiny_gguf import EOS, write_tiny_gguf

from hasten.backends.llamacpp.model import LlamaCppModel
from hasten.backends.llamacpp.tree_layout import kept_path_sequence, tree_sequences
from hasten.errors import HastenError
from hasten.tree import depths_of

VOCAB = 96


@functools.cache
def tiny(weights: str = "q8_0", **kwargs) -> LlamaCppModel:
    """A tiny random llama GGUF on llama.cpp, one per weight type (and options) for the whole session."""
    import tempfile

    folder = tempfile.mkdtemp(prefix="hasten-tiny-gguf-")
    path = write_tiny_gguf(f"{folder}/tiny-{weights}.gguf", weights=weights, vocab_size=VOCAB)
    return LlamaCppModel(path, threads=1, **kwargs)


def chain(n: int) -> list[int]:
    return [-1] + list(range(n - 1))


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(4, VOCAB) for _ in range(n)]


def random_tree(rng: random.Random, n: int) -> list[int]:
    return [-1] + [rng.randrange(i) for i in range(1, n)]


def paths_to_leaves(parents: list[int]) -> list[list[int]]:
    children = {p for p in parents if p >= 0}
    paths = []
    for leaf in (i for i in range(len(parents)) if i not in children):
        path = [leaf]
        while parents[path[-1]] != -1:
            path.append(parents[path[-1]])
        paths.append(path[::-1])
    return paths


def random_path(rng: random.Random, parents: list[int]) -> list[int]:
    """A root-down path that stops anywhere (the accepted guesses of one step)."""
    path = [0]
    while True:
        children = [i for i, p in enumerate(parents) if p == path[-1]]
        if not children or rng.random() < 0.3:
            return path
        path.append(rng.choice(children))


def assert_same_scores(got: torch.Tensor, want: torch.Tensor, exact: float, atol: float) -> None:
    """At least a fraction ``exact`` of the rows bit-identical, every row within ``atol``, and the same argmax
    wherever the expected top two logits are clearly apart. A wrong cache (a cell too many or too few)
    moves every later row, so it fails the first condition even when the values stay close."""
    assert got.shape == want.shape
    same = (got == want).all(-1)
    assert same.float().mean() >= exact, f"only {int(same.sum())} of {len(same)} rows bit-identical"
    assert torch.allclose(got, want, atol=atol, rtol=0), float((got - want).abs().max())
    top2 = want.topk(2, dim=-1).values
    clear = top2[:, 0] - top2[:, 1] > 2 * atol
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


# -- the layout, without llama.cpp


def test_tree_sequences_small_tree_by_hand():
    #        0
    #      /   \
    #     1     2
    #     |    / \
    #     3   4   5      leaves 3, 4, 5 -> sequences 0, 1, 2
    seqs, n = tree_sequences([-1, 0, 0, 1, 2, 2])
    assert n == 3
    assert seqs == [[0, 1, 2], [0], [1, 2], [0], [1], [2]]
    assert kept_path_sequence(seqs, [0, 2, 5]) == 2
    assert kept_path_sequence(seqs, [0, 2]) == 1  # the first leaf below token 2
    assert kept_path_sequence(seqs, [0, 1]) == 0
    assert kept_path_sequence(seqs, [0]) == 0
    assert kept_path_sequence(seqs, []) == 0


def test_tree_sequences_chain_is_one_sequence():
    seqs, n = tree_sequences(chain(5))
    assert n == 1 and seqs == [[0]] * 5


def test_tree_sequences_lookahead_window_by_hand():
    # Root, one guess chain 1 -> 2, then a W=3 x 2-level window laid out level by level (lookahead's
    # window_parents): level 0 is the chain 3 -> 4 -> 5 below the root, level 1 hangs off its own column.
    #   token: 0   1  2   3  4  5   6  7  8
    parents = [-1, 0, 1, 0, 3, 4, 3, 4, 5]
    assert depths_of(parents) == [0, 1, 2, 1, 2, 3, 2, 3, 4]  # column c, level l at depth c + 1 + l
    seqs, n = tree_sequences(parents)
    # leaves in index order: 2 (the guess), 6, 7, 8 (the columns' tops) -> sequences 0, 1, 2, 3
    assert n == 4
    assert seqs == [[0, 1, 2, 3], [0], [0], [1, 2, 3], [2, 3], [3], [1], [2], [3]]
    # Column 1 (tokens 4 and 7) sees the root, column 0's level 0 and itself: exactly sequence 2's tokens.
    assert [i for i, ids in enumerate(seqs) if 2 in ids] == [0, 3, 4, 7]
    assert kept_path_sequence(seqs, [0, 3, 4]) == 2


def test_tree_sequences_rejects_bad_parents():
    with pytest.raises(ValueError):
        tree_sequences([-1, 1])
    with pytest.raises(ValueError):
        tree_sequences([0])


# -- scoring on a tiny llama


@pytest.mark.parametrize(("weights", "exact", "atol"), [("q8_0", 1.0, 0.0), ("q4_0", 1.0, 0.0), ("f32", 0.0, 5e-3)])
def test_tree_logits_equal_each_path_as_a_chain(weights, exact, atol):
    model = tiny(weights)
    rng = random.Random(1)
    target, reference = model.new_target(), model.new_target()
    got, want = [], []
    for _ in range(20):
        context = tokens(rng, rng.randrange(1, 40))
        parents = random_tree(rng, rng.randrange(2, 24))
        toks = tokens(rng, len(parents))
        target.start(context)
        scores = target.score(toks, parents)
        assert scores.logits.shape == (len(parents), VOCAB) and scores.logits.dtype == torch.float32
        for path in paths_to_leaves(parents):
            reference.start(context)
            want.append(reference.score([toks[i] for i in path], chain(len(path))).logits)
            reference.commit([])
            got.append(scores.logits[path])
        target.commit(random_path(rng, parents))
        assert target.cache_problems() == []
    assert_same_scores(torch.cat(got), torch.cat(want), exact, atol)


def chain_at_once_and_one_by_one(model: LlamaCppModel, n: int, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    rng = random.Random(seed)
    context, toks = tokens(rng, 20), tokens(rng, n)
    target = model.new_target()
    target.start(context)
    at_once = target.score(toks, chain(n)).logits
    target.commit([])
    rows = []
    for token in toks:
        rows.append(target.score([token], [-1]).logits[0])
        target.commit([0])
    return at_once, torch.stack(rows)


@pytest.mark.parametrize("weights", ["q8_0", "q4_0"])
def test_quantized_weights_are_batch_invariant(weights):
    at_once, one_by_one = chain_at_once_and_one_by_one(tiny(weights), 8)
    assert torch.equal(at_once, one_by_one)


@pytest.mark.parametrize("weights", ["f32", "f16"])
def test_float_weights_are_close_across_batch_sizes(weights):
    at_once, one_by_one = chain_at_once_and_one_by_one(tiny(weights), 8)
    assert torch.equal(at_once.argmax(-1), one_by_one.argmax(-1))
    assert torch.allclose(at_once, one_by_one, atol=2e-2)


def test_kv_bookkeeping_over_long_random_generations():
    """Random trees, random accepted paths and the odd truncation: after every commit the real cache is exactly
    the committed positions, each once, in plain decoding's order, and the kept path's logits are bit-identical
    to those of a reference that decodes the same committed tokens as plain chains."""
    model = tiny("q8_0")
    rng = random.Random(3)
    target, reference = model.new_target(), model.new_target()
    got, want = [], []
    for _ in range(3):
        committed = tokens(rng, rng.randrange(1, 12))
        target.start(committed[:-1])
        reference.start(committed[:-1])
        for _ in range(150):
            parents = random_tree(rng, rng.randrange(1, 24))
            toks = [committed[-1]] + tokens(rng, len(parents) - 1)
            rows = sorted(rng.sample(range(len(parents)), rng.randrange(1, len(parents) + 1)))
            scores = target.score(toks, parents, rows)
            keep = random_path(rng, parents)
            target.commit(keep)
            assert target.cache_len == target.real_cache_len() == reference.cache_len + len(keep)
            assert target.cache_problems() == []
            expected = reference.score([toks[i] for i in keep], chain(len(keep))).logits
            reference.commit(list(range(len(keep))))
            for j, node in enumerate(keep):
                if node in rows:
                    got.append(scores.logits[rows.index(node)])
                    want.append(expected[j])
            committed = committed[:-1] + [toks[i] for i in keep] + tokens(rng, 1)
            if rng.random() < 0.05:  # a draft model rolling back
                cut = rng.randrange(1, target.cache_len + 1)
                target.truncate(cut)
                reference.truncate(cut)
                committed = committed[: cut + 1]
                assert target.cache_problems() == []
            if len(committed) > 400:
                break
        # Against a fresh prefill of the whole committed context: one batch of up to 400 tokens, so other
        # kernels (no bit-identity expected), but the same argmax where it is clear.
        last = target.score([committed[-1]], [-1]).logits
        target.commit([0])
        fresh = model.new_target()
        fresh.start(committed[:-1])
        assert_same_scores(last, fresh.score([committed[-1]], [-1]).logits, 0.0, 0.5)
    assert len(got) > 500
    assert_same_scores(torch.stack(got), torch.stack(want), 1.0, 0.0)


def test_logits_rows_any_order_and_repeats():
    model = tiny()
    target = model.new_target()
    target.start([5, 6, 7])
    parents = [-1, 0, 0, 1, 2]
    full = target.score([8, 9, 10, 11, 12], parents).logits
    target.commit([0])
    target.truncate(3)
    some = target.score([8, 9, 10, 11, 12], parents, [4, 0, 4, 2]).logits
    assert torch.equal(some, full[[4, 0, 4, 2]])
    target.commit([0, 2])
    none = target.score([12], [-1], [])
    assert none.logits.shape == (0, VOCAB)
    target.commit([0])
    assert target.cache_problems() == []


def test_chunked_prefill_and_passes_match_one_batch():
    """With n_batch = 16, a 50-token prefill and a 20-token tree go through llama_decode in chunks."""
    small, big = tiny("q8_0", n_batch=16), tiny("q8_0")
    rng = random.Random(4)
    context, parents = tokens(rng, 50), random_tree(rng, 20)
    toks = tokens(rng, 20)
    results = []
    for model in (small, big):
        target = model.new_target(want_hidden=True)
        first = target.start(context)
        scores = target.score(toks, parents)
        target.commit(random_path(random.Random(5), parents))
        assert target.cache_problems() == []
        results.append((first, scores))
    (first_a, scores_a), (first_b, scores_b) = results
    assert torch.equal(first_a.logits, first_b.logits) and torch.equal(first_a.hidden, first_b.hidden)
    assert torch.equal(scores_a.logits, scores_b.logits) and torch.equal(scores_a.hidden, scores_b.hidden)


def test_hidden_states_rows_and_logits_unchanged():
    model = tiny()
    plain, hidden = model.new_target(), model.new_target(want_hidden=True)
    context, parents, toks = [4, 5, 6, 7], [-1, 0, 1, 0, 3], [8, 9, 10, 11, 12]
    first_plain, first_hidden = plain.start(context), hidden.start(context)
    assert first_plain.hidden is None and first_hidden.hidden.shape == (1, model.hidden_size)
    assert torch.equal(first_plain.logits, first_hidden.logits)  # logits still come with embeddings on
    with_plain = plain.score(toks, parents, [0, 2, 4])
    with_hidden = hidden.score(toks, parents, [4, 0, 2])
    assert with_hidden.hidden.shape == (3, model.hidden_size) and with_hidden.hidden.dtype == torch.float32
    assert torch.equal(with_plain.logits[[2, 0, 1]], with_hidden.logits)
    # a tree row's hidden state equals the same token's hidden state on its path decoded as a chain
    chain_target = model.new_target(want_hidden=True)
    chain_target.start(context)
    on_path = chain_target.score([8, 11, 12], chain(3)).hidden
    assert torch.equal(with_hidden.hidden[0], on_path[2]) and torch.equal(with_hidden.hidden[1], on_path[0])
    empty = model.new_target(want_hidden=True).start([])
    assert empty.logits.shape == (0, VOCAB) and empty.hidden.shape == (0, model.hidden_size)


def test_hidden_states_are_after_the_final_norm(tmp_path):
    """Against transformers on the same GGUF: llama.cpp's embeddings point the way of the final norm's output
    (cosine ~1), not its input (the tiny model's final norm is far from the identity)."""
    from transformers import AutoModelForCausalLM

    path = write_tiny_gguf(tmp_path / "tiny.gguf", weights="q8_0", vocab_size=VOCAB)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    captured = {}
    hf.model.norm.register_forward_hook(lambda module, args, out: captured.update(pre=args[0][0], post=out[0]))
    ids = [5, 9, 33, 12, 70, 41, 8, 3]
    with torch.no_grad():
        hf_logits = hf(torch.tensor([ids])).logits[0]
    target = LlamaCppModel(path, threads=1).new_target(want_hidden=True)
    target.start(ids[:1])
    scores = target.score(ids[1:], chain(len(ids) - 1))
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(scores.hidden, captured["post"][1:]).min() > 0.99
    assert cosine(scores.hidden, captured["pre"][1:]).max() < 0.8
    assert cosine(scores.logits, hf_logits[1:]).min() > 0.99  # llama.cpp also quantizes activations


def test_model_fields_and_embedding_tables(tmp_path):
    model = tiny()
    assert (model.backend, model.architecture, model.vocab_size, model.hidden_size) == ("llamacpp", "llama", VOCAB, 64)
    assert model.max_context == 512 and model.eos_token_ids == frozenset({EOS})
    embed, out = model.input_embeddings(), model.output_embeddings()
    assert embed.shape == out.shape == (VOCAB, 64) and embed.dtype == out.dtype == torch.float32
    assert not torch.equal(embed, out) and model.input_embeddings() is embed  # cached
    tied = LlamaCppModel(write_tiny_gguf(tmp_path / "tied.gguf", tied=True, vocab_size=VOCAB), threads=1)
    assert torch.equal(tied.output_embeddings(), tied.input_embeddings())
    # The logits are the output table applied to the hidden states (up to llama.cpp's quantized activations).
    target = model.new_target(want_hidden=True)
    scores = target.start([4, 5, 6])
    assert torch.allclose(scores.hidden @ out.T, scores.logits, atol=0.1, rtol=0.02)


def test_contexts_are_pooled_and_come_back_clean():
    model = tiny("q4_0")
    first = model.new_target()
    first.start([4, 5, 6, 7])
    first.score([8, 9, 10], [-1, 0, 0])
    context = first._ctx
    del first  # not committed: the pooled context must still come back empty
    second = model.new_target()
    assert second._ctx == context
    assert second.kv_cells() == [] and second.real_cache_len() == 0
    fresh = LlamaCppModel(model.path, threads=1).new_target()
    assert torch.equal(second.start([4, 5, 6, 7]).logits, fresh.start([4, 5, 6, 7]).logits)


def test_protocol_misuse_is_refused():
    model = tiny()
    target = model.new_target()
    target.start([4, 5])
    with pytest.raises(RuntimeError):
        target.commit([0])
    target.score([6, 7, 8], [-1, 0, 0])
    with pytest.raises(RuntimeError):
        target.score([6], [-1])
    with pytest.raises(RuntimeError):
        target.truncate(1)
    for bad in ([1], [0, 2, 1], [0, 3]):
        with pytest.raises(ValueError):
            target.commit(bad)
    target.commit([0, 2])
    with pytest.raises(ValueError):
        target.truncate(5)
    with pytest.raises(ValueError):
        target.score([6, 7], [-1, 0], [2])
    assert target.cache_problems() == []
    target.close()
    with pytest.raises(RuntimeError):
        target.start([4])


def test_context_limits_are_clear_errors():
    model = tiny()
    target = model.new_target()
    with pytest.raises(HastenError, match="context"):
        target.start(list(range(4, 4 + 100)) * 6)
    target.start([5] * 500)
    target.score([6] * 10, chain(10))
    target.commit(list(range(10)))
    with pytest.raises(HastenError, match="context of 512"):
        target.score([6] * 3, chain(3))
    assert target.cache_problems() == []
    narrow = tiny("q8_0", n_seq_max=4).new_target()
    narrow.start([5])
    with pytest.raises(HastenError, match="n_seq_max"):
        narrow.score([6] * 5, [-1, 0, 0, 0, 0])  # 4 leaves: the last sequence id is the commit's scratch
    narrow.score([6] * 4, [-1, 0, 0, 0])  # 3 leaves fit
    narrow.commit([0, 3])
    assert narrow.cache_problems() == []


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(HastenError, match="not found"):
        LlamaCppModel(tmp_path / "missing.gguf")
    text = tmp_path / "notes.gguf"
    text.write_text("hello, not a model\n")
    with pytest.raises(HastenError, match="not a GGUF file"):
        LlamaCppModel(text)
    unknown = write_tiny_gguf(tmp_path / "alien.gguf", architecture="alienformer")
    with pytest.raises(HastenError) as error:
        LlamaCppModel(unknown)
    message = str(error.value)
    assert "\n" not in message and "alienformer" in message and "architecture" in message
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(write_tiny_gguf(tmp_path / "whole.gguf").read_bytes()[:2000])
    with pytest.raises(HastenError, match="cannot load"):
        LlamaCppModel(truncated)


# -- the real default model (SmolLM2-135M-Instruct Q4_1)


@pytest.fixture(scope="module")
def real_model():
    from hasten.models import default_model_path

    try:
        path = default_model_path()
    except HastenError as error:
        pytest.skip(str(error))
    return LlamaCppModel(path, threads=2)


@pytest.mark.slow
def test_real_model_trees_commits_and_batch_invariance(real_model):
    """Q4_1: a random tree equals its paths decoded as chains, bit for bit, and commits keep the cache exact."""
    model = real_model
    assert model.architecture == "llama" and model.vocab_size == 49152 and model.hidden_size == 576
    rng = random.Random(7)
    context = [rng.randrange(100, 20000) for _ in range(40)]
    target, reference = model.new_target(), model.new_target()
    target.start(context)
    for _ in range(4):
        parents = random_tree(rng, 10)
        toks = [rng.randrange(100, 20000) for _ in parents]
        scores = target.score(toks, parents)
        for path in paths_to_leaves(parents):
            reference.start(context)
            expected = reference.score([toks[i] for i in path], chain(len(path))).logits
            reference.commit([])
            assert torch.equal(scores.logits[path], expected)
        keep = random_path(rng, parents)
        target.commit(keep)
        context = context + [toks[i] for i in keep]
        assert target.cache_problems() == []
    at_once, one_by_one = chain_at_once_and_one_by_one(model, 8)
    assert torch.equal(at_once, one_by_one)


@pytest.mark.slow
def test_real_model_hidden_states_match_transformers_after_the_norm(real_model):
    from transformers import AutoModelForCausalLM

    path = real_model.path
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    captured = {}
    hf.model.norm.register_forward_hook(lambda module, args, out: captured.update(pre=args[0][0], post=out[0]))
    ids = [1, 4093, 314, 2103, 282, 253, 3458, 30, 378, 436, 314, 253, 1345, 28, 2372, 42, 1826, 2]
    with torch.no_grad():
        hf_logits = hf(torch.tensor([ids])).logits[0]
    target = real_model.new_target(want_hidden=True)
    target.start(ids[:-6])
    scores = target.score(ids[-6:], chain(6))
    cosine = torch.nn.functional.cosine_similarity
    post = cosine(scores.hidden, captured["post"][-6:])
    pre = cosine(scores.hidden, captured["pre"][-6:])
    assert post.min() > 0.99 and (post > pre).all() and pre.mean() < 0.8, (post, pre)
    assert cosine(scores.logits, hf_logits[-6:]).min() > 0.97
    embed = real_model.input_embeddings()
    assert torch.allclose(embed, hf.model.embed_tokens.weight.detach(), atol=1e-6)
    assert np.isclose(float(real_model.output_embeddings().sum()), float(embed.sum()))  # tied in SmolLM2


class DecodeRecorder:
    """A llama.cpp library that records each llama_decode's token count and whether embeddings were on."""

    def __init__(self, lib: Any) -> None:
        self.lib, self.embeddings, self.decodes = lib, True, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.lib, name)

    def llama_set_embeddings(self, ctx: Any, on: bool) -> None:
        self.embeddings = bool(on)
        self.lib.llama_set_embeddings(ctx, on)

    def llama_decode(self, ctx: Any, batch: Any) -> int:
        self.decodes.append((batch.n_tokens, self.embeddings))
        return self.lib.llama_decode(ctx, batch)


def test_a_prefill_with_hidden_states_computes_one_row_and_gives_the_same_bits(tmp_path):
    """A target that wants hidden states prefills the whole prompt in one batch with embeddings off (as a plain
    target does; with them on llama.cpp would compute the logits of every row), then the last token's hidden state
    in a one-token pass on the side; its last row and its cells equal the all-rows way's."""
    path = write_tiny_gguf(tmp_path / "wide.gguf", hidden=128, heads=4, kv_heads=2, ffn=256, context=1024,
                           vocab_size=VOCAB, init_std=0.5)
    model = LlamaCppModel(path, threads=2, prompt_cache_bytes=0)
    rng = random.Random(4)
    for length in (2, 17, 90):
        prompt = [rng.randrange(2, VOCAB) for _ in range(length)]
        quick = model.new_target(want_hidden=True)
        quick._lib = recorder = DecodeRecorder(quick._lib)
        got = quick.start(prompt)
        assert recorder.decodes == [(length, False), (1, True)]  # (tokens, embeddings on) of each llama_decode
        quick._lib = recorder.lib
        every_row = model.new_target(want_hidden=True)  # the prompt as one scored chain: every row an output
        every_row.start(prompt[:1])
        want = every_row.score(prompt[1:], list(range(-1, length - 2)))
        every_row.commit(list(range(length - 1)))
        assert torch.equal(got.logits[-1], want.logits[-1]) and torch.equal(got.hidden[-1], want.hidden[-1])
        assert torch.equal(got.logits[-1], model.new_target().start(prompt).logits[-1])
        after = [quick.score([5, 6], [-1, 0]), every_row.score([5, 6], [-1, 0])]  # the cells agree too
        assert torch.equal(after[0].logits, after[1].logits) and torch.equal(after[0].hidden, after[1].hidden)


def test_the_decode_log_times_each_llama_decode_a_target_runs_while_it_is_set():
    model = tiny(n_batch=4)  # a prompt of 10 tokens runs in decodes of 4, 4 and 2
    model.forget_prompts()  # none restored from the prompt cache
    target = model.new_target()
    model.decode_log = log = []
    target.start(list(range(1, 11)))
    target.score([5, 6, 7], [-1, 0, 1])
    model.decode_log = None
    target.commit([0])
    target.score([8], [-1])
    assert [tokens for tokens, _ in log] == [4, 4, 2, 3]
    assert all(seconds > 0 for _, seconds in log)
    target.close()
