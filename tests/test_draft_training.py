"""Self-distillation data, the draft trainer, and the shipped draft for ``--method draft``."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hasten.api import generate, prompt_ids
from hasten.backends.transformers.target import TransformersModel, TransformersTarget
from hasten.draft.model import build_draft, load_draft_dir, save_draft
from hasten.engine import DecodeStats, decode
from hasten.errors import HastenError
from hasten.proposers.reduced_draft import ReducedVocabDraftProposer
from hasten.sampling import SamplingParams
from hasten.training import draft as draft_training
from hasten.training import draft_batches, selfdistill
from hasten.training.token_data import shard_corpus, split_by_prompt, token_corpus, union
from tests.conftest import EOS, exact_sequence_probs, greedy_reference, random_prompts, tiny_loaded

TINY_PROMPTS = [("tiny", " ".join(f"w{(7 * i + 3 * j) % 60 + 2}" for j in range(4 + i % 5))) for i in range(10)]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    loaded = tiny_loaded("llama", seed=3, vocab_size=64)
    out = tmp_path_factory.mktemp("distill")
    meta = selfdistill.build(loaded, TINY_PROMPTS, out, top_k=8, max_new_tokens=12, shard_size=4, progress=False)
    return loaded, out, meta


def test_data_format(tiny_data):
    loaded, out, meta = tiny_data
    assert meta["sequences"] == 10 and meta["shards"] == 3 and meta["top_k"] == 8 and meta["hidden_size"] == 32
    assert json.loads((out / "meta.json").read_text())["tokens"] == meta["tokens"]
    shard = load_file(str(out / "shard_00000.safetensors"))
    dtypes = {"tokens": torch.int64, "seq_starts": torch.int64, "loss_mask": torch.bool, "hidden": torch.float16,
              "topk_ids": torch.int64, "topk_logprobs": torch.float16}
    assert {name: t.dtype for name, t in shard.items()} == dtypes
    t = len(shard["tokens"])
    assert shard["seq_starts"].tolist()[0] == 0 and shard["seq_starts"].tolist()[-1] == t
    assert len(shard["seq_starts"]) == 5
    assert shard["hidden"].shape == (t, 32) and shard["topk_ids"].shape == (t, 8) and shard["loss_mask"].shape == (t,)
    for i, (_, prompt) in enumerate(TINY_PROMPTS[:4]):
        a, b = shard["seq_starts"][i].item(), shard["seq_starts"][i + 1].item()
        tokens = shard["tokens"][a:b].tolist()
        ids = prompt_ids(loaded, prompt)
        answer = greedy_reference(loaded.model, ids, 12)
        assert tokens == ids + answer  # the prompt then the target's own greedy answer
        mask = shard["loss_mask"][a:b]
        assert mask.tolist() == [False] * (len(ids) - 1) + [True] * len(answer) + [False]
        with torch.no_grad():
            out = loaded.model(torch.tensor([tokens]), output_hidden_states=True)
        hidden = out.hidden_states[-1][0]
        torch.testing.assert_close(shard["hidden"][a:b].float(), hidden, atol=2e-3, rtol=2e-3)
        values, top = torch.log_softmax(out.logits[0].float(), -1).topk(8, -1)
        assert (shard["topk_ids"][a:b][:, :3] == top[:, :3]).all()  # ties in the tail may reorder, not the head
        torch.testing.assert_close(shard["topk_logprobs"][a:b].float(), values, atol=1e-2, rtol=1e-3)


def test_load_shards_concatenates(tiny_data):
    _, out, meta = tiny_data
    data = selfdistill.load_shards(out)
    assert data.num_sequences == 10 and len(data.tokens) == meta["tokens"] == data.seq_starts[-1].item()
    last = load_file(str(out / "shard_00002.safetensors"))
    seq = data.sequence(9)
    assert seq["tokens"].tolist() == last["tokens"][last["seq_starts"][1] :].tolist()
    assert torch.equal(seq["hidden"], last["hidden"][last["seq_starts"][1] :])


def test_build_resumes_and_refuses_other_plans(tiny_data):
    loaded, out, meta = tiny_data
    path = out / "shard_00001.safetensors"
    before = path.stat().st_mtime_ns
    (out / "shard_00002.safetensors").unlink()
    again = selfdistill.build(loaded, TINY_PROMPTS, out, top_k=8, max_new_tokens=12, shard_size=4, progress=False)
    assert again == meta and path.stat().st_mtime_ns == before  # only the missing shard was rebuilt
    with pytest.raises(HastenError, match="other prompts"):
        selfdistill.build(loaded, TINY_PROMPTS[:5], out, top_k=8, max_new_tokens=12, shard_size=4, progress=False)


def test_build_from_tokens_teacher_forces_given_answers(tiny_data, tmp_path):
    """A token-only file's answers are kept and teacher-forced: the same tensors as a generated build."""
    from safetensors.torch import save_file

    loaded, out, _ = tiny_data
    data = selfdistill.load_shards(out)
    prompt_lens = [len(prompt_ids(loaded, p)) for _, p in TINY_PROMPTS]
    token_file = tmp_path / "answers.safetensors"
    save_file({"tokens": data.tokens.to(torch.int32), "seq_starts": data.seq_starts,
               "prompt_lens": torch.tensor(prompt_lens), "prompt_index": torch.arange(10) + 100}, str(token_file))
    built = tmp_path / "forced"
    meta = selfdistill.build_from_tokens(loaded, token_file, built, top_k=8, shard_size=3, limit=7, progress=False)
    assert meta["sequences"] == 7 and meta["shards"] == 3
    plan = json.loads((built / "prompts.json").read_text())["sequences"]
    assert len(set(plan)) == 7 and plan != sorted(plan)  # a seeded random subset
    forced = selfdistill.load_shards(built)
    for row, index in enumerate(plan):
        got, want = forced.sequence(row), data.sequence(index)
        assert torch.equal(got["tokens"], want["tokens"]) and torch.equal(got["loss_mask"], want["loss_mask"])
        torch.testing.assert_close(got["hidden"].float(), want["hidden"].float(), atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(got["topk_logprobs"].float(), want["topk_logprobs"].float(), atol=1e-2, rtol=1e-3)
    first = load_file(str(built / "shard_00000.safetensors"))
    assert first["prompt_index"].tolist() == [i + 100 for i in plan[:3]]
    again = selfdistill.build_from_tokens(loaded, token_file, built, top_k=8, shard_size=3, limit=7, progress=False)
    assert again == meta
    with pytest.raises(HastenError, match="other sequences"):
        selfdistill.build_from_tokens(loaded, token_file, built, top_k=8, shard_size=3, limit=5, progress=False)


def test_plan_interleaves_sources():
    pairs = [("a", f"a{i}") for i in range(5)] + [("b", f"b{i}") for i in range(2)]
    planned = selfdistill.plan_prompts(pairs, 6, seed=1)
    assert [s for s, _ in planned] == ["a", "b", "a", "b", "a", "a"]
    assert planned == selfdistill.plan_prompts(pairs, 6, seed=1)


def test_read_prompt_files_rejects_bad_lines(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "hello"}\n\n{"prompt": "world", "x": 1}\n')
    assert selfdistill.read_prompt_files([str(good)]) == [("p.jsonl", "hello"), ("p.jsonl", "world")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt"}\n')
    with pytest.raises(HastenError, match="bad.jsonl:1"):
        selfdistill.read_prompt_files([str(bad)])
    with pytest.raises(HastenError, match="not found"):
        selfdistill.read_prompt_files([str(tmp_path / "missing.jsonl")])


# --- the trainer -------------------------------------------------------------------------------------------

def _cfg(epochs: int) -> draft_training.TrainConfig:
    return draft_training.TrainConfig(layers=[0], draft_vocab=40, epochs=epochs, lr=3e-3, batch_tokens=16,
                                      val_fraction=0.2)


def test_choose_vocab_keeps_eos_and_frequent_tokens(tiny_data):
    _, out, _ = tiny_data
    data = selfdistill.load_shards(out)
    ids = draft_training.choose_vocab(data, 40, 64, {EOS})
    assert len(ids) == 40 and EOS in ids.tolist() and ids.tolist() == sorted(set(ids.tolist()))
    top1 = torch.bincount(data.topk_ids[:, 0], minlength=64)
    assert int(top1.argmax()) in ids.tolist()


def test_training_lowers_loss_and_resumes(tiny_data, tmp_path):
    loaded, out, _ = tiny_data
    data = selfdistill.load_shards(out)
    info = draft_training.train(loaded, data, tmp_path / "ckpt", _cfg(3), progress=False)
    history = info["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2, 3] and info["epochs_done"] == 3
    train_ids, _ = draft_training.split_sequences(data, 0.2, 0)
    trained, vocab_ids, _ = load_draft_dir(loaded.model, tmp_path / "ckpt")
    fresh = build_draft(loaded.model, vocab_ids, [0])
    remap = torch.full((64,), -1, dtype=torch.long)
    remap[vocab_ids] = torch.arange(len(vocab_ids))
    corpus = shard_corpus(data)
    before, _ = draft_batches.evaluate(fresh, corpus, train_ids, remap, 16, 0.2)
    after, _ = draft_batches.evaluate(trained, corpus, train_ids, remap, 16, 0.2)
    assert after < before - 0.1  # the training loss went down
    # save / load round trip: the reloaded draft computes what was saved
    draft, vocab_ids, config = load_draft_dir(loaded.model, tmp_path / "ckpt")
    assert config["epochs_done"] == 3 and len(vocab_ids) == 40
    again = draft_training.train(loaded, data, tmp_path / "ckpt", _cfg(3), resume=True, progress=False)
    assert again["epochs_done"] == 3  # nothing left to do
    more = draft_training.train(loaded, data, tmp_path / "ckpt", _cfg(4), resume=True, progress=False)
    assert more["epochs_done"] == 4 and len(more["history"]) == 5 and more["history"][:4] == history
    resumed, _, _ = load_draft_dir(loaded.model, tmp_path / "ckpt")
    ids = torch.tensor([data.sequence(0)["tokens"].tolist()])
    with torch.no_grad():
        assert not torch.equal(resumed(ids).logits, draft(ids).logits)  # the fourth epoch changed the weights
    save_draft(resumed, vocab_ids, tmp_path / "fp16", {"init_layers": [0]})
    half, _, _ = load_draft_dir(loaded.model, tmp_path / "fp16")
    with torch.no_grad():
        torch.testing.assert_close(half(ids).logits, resumed(ids).logits, atol=0.05, rtol=0.05)
    with pytest.raises(HastenError, match="nothing to resume"):
        draft_training.train(loaded, data, tmp_path / "empty", _cfg(1), resume=True, progress=False)


def test_bfloat16_autocast_trains_fp32_weights(tiny_data, tmp_path, monkeypatch):
    loaded, out, _ = tiny_data
    data = selfdistill.load_shards(out)
    cfg = _cfg(3)
    cfg.autocast = "bfloat16"
    seen: list[tuple[bool, torch.dtype]] = []

    def watched(*args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return draft_batches.batch_loss(*args, **kwargs)

    monkeypatch.setattr(draft_training, "batch_loss", watched)
    info = draft_training.train(loaded, data, tmp_path / "bf16", cfg, progress=False)
    assert info["train"]["autocast"] == "bfloat16"
    assert seen and set(seen) == {(True, torch.bfloat16)}  # every training pass ran under bfloat16 autocast
    trained, vocab_ids, _ = load_draft_dir(loaded.model, tmp_path / "bf16")
    assert {p.dtype for p in trained.parameters()} == {torch.float32}  # the checkpoint keeps fp32 weights
    remap = torch.full((64,), -1, dtype=torch.long)
    remap[vocab_ids] = torch.arange(len(vocab_ids))
    train_ids, _ = draft_training.split_sequences(data, 0.2, 0)
    corpus = shard_corpus(data)
    before, _ = draft_batches.evaluate(build_draft(loaded.model, vocab_ids, [0]), corpus, train_ids, remap, 16, 0.2)
    after, _ = draft_batches.evaluate(trained, corpus, train_ids, remap, 16, 0.2)  # in fp32
    assert after < before - 0.1


def test_shard_data_and_token_files_train_together(tiny_data, tmp_path):
    from tests.test_draft_token_training import _sequences, write_token_file

    loaded, out, _ = tiny_data
    write_token_file(tmp_path / "greedy_a.safetensors", _sequences(12, seed=0))
    shards, tokens = shard_corpus(selfdistill.load_shards(out)), token_corpus(tmp_path)
    joined = union([shards, tokens])
    assert len(joined) == len(shards) + len(tokens)
    assert not set(joined.prompts[: len(shards)]) & set(joined.prompts[len(shards) :])  # prompts kept apart
    train_items, val_items = split_by_prompt(joined, 0.3, 0)
    assert {i < len(shards) for i in val_items} == {True, False}  # both parts give validation answers
    vocab_ids = draft_training.choose_vocab(joined, 40, 64, {EOS}, train_items)
    draft = build_draft(loaded.model, vocab_ids, [0])
    remap = torch.full((64,), -1, dtype=torch.long)
    remap[vocab_ids] = torch.arange(len(vocab_ids))
    soft, hard = [0, 1], [len(shards), len(shards) + 1]
    mixed = draft_batches.collate(joined, soft + hard, remap, 0.0)
    assert mixed["soft"][:2].any() and not mixed["soft"][2:].any()
    with torch.no_grad():  # a mixed batch's loss is its parts' losses: soft labels (+ top-1 term) and hard ones
        parts = [draft_batches.batch_loss(draft, draft_batches.collate(joined, group, remap, 0.0), 0.2)
                 for group in (soft, hard)]
        loss, _, weight = draft_batches.batch_loss(draft, mixed, 0.2)
    summed = sum(part_loss * len(part_weight) for part_loss, _, part_weight in parts)
    torch.testing.assert_close(loss * len(weight), summed, atol=1e-4, rtol=1e-4)
    cfg = _cfg(2)
    info = draft_training.train(loaded, joined, tmp_path / "joined", cfg, progress=False)
    assert info["epochs_done"] == 2 and info["data"]["sequences"] == len(joined)


def test_build_draft_refuses_bad_layers():
    loaded = tiny_loaded("llama", seed=0)
    with pytest.raises(HastenError, match="indices"):
        build_draft(loaded.model, torch.arange(10), [5])
    with pytest.raises(HastenError, match="llama"):
        build_draft(tiny_loaded("qwen2", seed=0).model, torch.arange(10), [0])


# --- the reduced-vocabulary proposer -------------------------------------------------------------------------

def _reduced(loaded, size: int, params: SamplingParams, num_tokens: int = 4, generator=None):
    vocab_ids = torch.tensor(sorted({EOS, *range(64 - size + 1, 64)}))[:size]
    draft = build_draft(loaded.model, vocab_ids, [0])
    vocab = loaded.model.get_output_embeddings().weight.shape[0]
    return ReducedVocabDraftProposer(TransformersModel(draft), vocab_ids, vocab, params, num_tokens=num_tokens,
                                     generator=generator)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reduced_draft_greedy_is_exact(seed):
    loaded = tiny_loaded("llama", seed=seed, init_std=0.05)
    params = SamplingParams()
    accepted = 0
    for prompt in random_prompts(12, seed=seed):
        stats = DecodeStats()
        proposer = _reduced(loaded, 48, params)
        out = [t for chunk in decode(TransformersTarget(loaded.model), proposer, prompt, 20, params,
                                     loaded.eos_token_ids, stats) for t in chunk]
        assert out == greedy_reference(loaded.model, prompt, 20)
        accepted += stats.accepted_drafts
    assert accepted > 0  # the draft was right sometimes, so the accepting path was exercised too


def test_reduced_draft_sampling_is_lossless():
    """Chi-square of the first three sampled tokens (the first from the prefill, the next two drafted) against
    the target's exact marginals."""
    scipy_stats = pytest.importorskip("scipy.stats")
    vocab = 16
    loaded = tiny_loaded("llama", seed=5, vocab_size=vocab, init_std=0.1)
    vocab_ids = torch.tensor([1, 2, 3, 5, 8, 9, 12, 15])  # half the vocabulary: p is zero elsewhere
    draft = build_draft(loaded.model, vocab_ids, [0])
    prompt = [3, 7, 11, 5]
    params = SamplingParams(temperature=1.0, seed=1234)
    generator = params.generator()
    target = TransformersTarget(loaded.model)
    draws = 1500
    counts = torch.zeros(3, vocab)
    accepted = 0
    for _ in range(draws):
        proposer = ReducedVocabDraftProposer(TransformersModel(draft), vocab_ids, vocab, params, num_tokens=2,
                                             generator=generator)
        stats = DecodeStats()
        out = [t for chunk in decode(target, proposer, prompt, 3, params, frozenset(), stats, generator)
               for t in chunk]
        for position, token in enumerate(out):
            counts[position, token] += 1
        accepted += stats.accepted_drafts
    assert accepted > draws // 4
    expected = torch.zeros(3, vocab, dtype=torch.float64)
    for sequence, p in exact_sequence_probs(loaded.model, prompt, params.probs, 3).items():
        for position, token in enumerate(sequence):
            expected[position, token] += p
    for observed, probs in zip(counts, expected, strict=True):
        exp = probs.double() * draws
        keep = exp >= 5
        obs = torch.cat([observed[keep].double(), observed[~keep].sum().reshape(1).double()])
        ex = torch.cat([exp[keep], exp[~keep].sum().reshape(1)])
        if ex[-1] < 5:
            obs, ex = obs[:-1], ex[:-1]
            obs = obs * ex.sum() / obs.sum()
        assert scipy_stats.chisquare(obs.numpy(), ex.numpy()).pvalue > 0.001


# --- the shipped draft on the default model ------------------------------------------------------------------

@pytest.mark.slow
def test_shipped_draft_greedy_is_exact_on_default_model_hf(default_model_hf):
    from hasten.methods import build_proposer

    proposer = build_proposer("draft", default_model_hf, SamplingParams())
    assert isinstance(proposer, ReducedVocabDraftProposer)  # loaded automatically, no --draft-model
    assert len(proposer.vocab_ids) < default_model_hf.model.get_output_embeddings().weight.shape[0]
    for prompt in ("Write a Python function that adds two numbers.", "Name three colours of the rainbow."):
        ids = prompt_ids(default_model_hf, prompt)
        result = generate(default_model_hf, prompt, "draft", max_new_tokens=48, adaptive=False)  # drafts always
        reference = default_model_hf.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                                 dtype=torch.long), max_new_tokens=48, do_sample=False)
        assert result.token_ids == reference[0, len(ids):].tolist()
        assert result.drafted_tokens > 0


def test_cli_builds_data_from_a_token_file_with_the_default_model(tmp_path):
    """`hasten train data --from-tokens` loads the llama.cpp default through transformers (it needs hidden states)."""
    from safetensors.torch import save_file

    from hasten.cli import main

    tokens = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], dtype=torch.int32)
    token_file = tmp_path / "t.safetensors"
    save_file({"tokens": tokens, "seq_starts": torch.tensor([0, 4, 10]), "prompt_lens": torch.tensor([2, 3]),
               "prompt_index": torch.tensor([0, 1])}, str(token_file))
    refused = main(["train", "data", "--from-tokens", str(token_file), "--method", "ar", "--out", str(tmp_path / "x")])
    assert refused != 0 and not (tmp_path / "x").exists()  # --method would generate answers: refused, nothing built
    assert main(["train", "data", "--from-tokens", str(token_file), "--out", str(tmp_path / "d")]) == 0
    data = selfdistill.load_shards(tmp_path / "d")
    assert data.tokens.tolist() == tokens.tolist() and data.hidden.shape == (10, 576)
    assert data.loss_mask.tolist() == [False, True, True, False, False, False, True, True, True, False]
