"""The draft trainer on token-only answer files (the format of ``../shared/data/distill-smollm2``), on tiny
synthetic data written here: reading, the split by prompt, resuming, and learning."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from hasten.draft.model import load_draft_dir, trainable_state
from hasten.errors import HastenError
from hasten.training import draft as draft_training
from hasten.training import draft_batches
from hasten.training.token_data import TokenFile, split_by_prompt, token_corpus
from tests.conftest import EOS, tiny_loaded

VOCAB = 64


def _answer(prompt: list[int], length: int) -> list[int]:
    """A deterministic rule a draft can learn: each answer token follows from the one before."""
    out = [prompt[-1]]
    for _ in range(length):
        out.append((out[-1] * 5 + 3) % (VOCAB - 2) + 2)
    return out[1:] + [EOS]


def _sequences(prompts: int, seed: int) -> list[tuple[list[int], list[int], int]]:
    gen = torch.Generator().manual_seed(seed)
    seqs = []
    for p in range(prompts):
        prompt = torch.randint(2, VOCAB, (int(torch.randint(3, 8, (1,), generator=gen)),), generator=gen).tolist()
        seqs.append((prompt, _answer(prompt, int(torch.randint(4, 12, (1,), generator=gen))), p))
    return seqs


def write_token_file(path, sequences: list[tuple[list[int], list[int], int]]) -> None:
    """A token-only file: (prompt ids, answer ids, prompt index) per sequence."""
    tokens = [t for prompt, answer, _ in sequences for t in prompt + answer]
    lengths = torch.tensor([0] + [len(p) + len(a) for p, a, _ in sequences])
    save_file({"tokens": torch.tensor(tokens, dtype=torch.int32), "seq_starts": lengths.cumsum(0),
               "prompt_lens": torch.tensor([len(p) for p, _, _ in sequences], dtype=torch.int64),
               "prompt_index": torch.tensor([i for _, _, i in sequences], dtype=torch.int64)}, str(path))


@pytest.fixture
def token_dir(tmp_path):
    seqs = _sequences(30, seed=0)
    write_token_file(tmp_path / "greedy_a.safetensors", seqs)
    copy = [s if i % 3 else (s[0], s[1][:-2] + [7, EOS], s[2]) for i, s in enumerate(seqs)]  # a near-duplicate
    write_token_file(tmp_path / "greedy_b.safetensors", copy)
    shuffled = [seqs[i] for i in torch.randperm(30, generator=torch.Generator().manual_seed(1)).tolist()]
    write_token_file(tmp_path / "sampled_1.safetensors", [(p, a[1:] + [EOS], i) for p, a, i in shuffled])
    return tmp_path, seqs


def test_token_file_streams_sequences_and_labels(token_dir):
    directory, seqs = token_dir
    file = TokenFile(directory / "greedy_a.safetensors")
    held = sum(t.numel() for t in vars(file).values() if isinstance(t, torch.Tensor))
    assert held < int(file.seq_starts[-1])  # only the index arrays are read up front, not the tokens
    for index in (0, 17, 29):
        prompt, answer, _ = seqs[index]
        example = file.example(index)
        assert example["tokens"].tolist() == prompt + answer
        # the loss falls where the next token is an answer token: from the prompt's last token to the one before EOS
        assert example["loss_mask"].tolist() == [False] * (len(prompt) - 1) + [True] * len(answer) + [False]
    corpus = token_corpus(directory, val_files="greedy*")
    remap = torch.arange(VOCAB)
    remap[7] = -1  # a token outside the draft vocabulary
    batch = draft_batches.collate(corpus, [0, 5], remap, prompt_weight=0.0)
    for row, item in enumerate((0, 5)):
        prompt, answer, _ = seqs[item]
        tokens = prompt + answer
        n = len(tokens)
        assert batch["ids"][row, :n].tolist() == tokens and batch["attention"][row].sum() == n
        expected = [t if t != 7 else -1 for t in tokens[1:]]
        assert batch["top_rows"][row, : n - 1, 0].tolist() == expected  # hard label: the next token
        assert batch["weight"][row].nonzero().flatten().tolist() == list(range(len(prompt) - 1, n - 1))


def test_corpus_dedupes_weights_and_splits_by_prompt(token_dir):
    directory, _ = token_dir
    corpus = token_corpus(directory, weights="sampled*=0.5,greedy_b=2")
    files = corpus.meta["files"]
    assert files["greedy_a.safetensors"]["kept"] == 30
    assert files["greedy_b.safetensors"]["kept"] == 10  # 20 of its 30 are copies of greedy_a's answers
    assert files["sampled_1.safetensors"]["kept"] == 30 and len(corpus) == 70
    by_file = {corpus.sources[s].path.stem: corpus.weights[i] for i, (s, _) in enumerate(corpus.items)}
    assert by_file == {"greedy_a": 1.0, "greedy_b": 2.0, "sampled_1": 0.5}
    train, val = split_by_prompt(corpus, 0.2, seed=3)
    train_prompts = {corpus.prompts[i] for i in train}
    val_prompts = {corpus.prompts[i] for i in val}
    assert len(val_prompts) == 6 and not train_prompts & val_prompts  # no prompt on both sides, across files
    assert train_prompts | val_prompts == set(range(30))
    assert all(corpus.sources[corpus.items[i][0]].path.stem.startswith("greedy") for i in val)
    assert split_by_prompt(corpus, 0.2, seed=3) == (train, val)
    assert len(token_corpus(directory, weights="sampled*=0")) == 40
    with pytest.raises(HastenError, match="weights"):
        token_corpus(directory, weights="greedy*=lots")


def _cfg(**kw) -> draft_training.TrainConfig:
    base = {"layers": [0], "draft_vocab": 48, "epochs": 2, "lr": 3e-3, "batch_tokens": 48, "prompt_weight": 0.0,
            "val_fraction": 0.2}
    return draft_training.TrainConfig(**{**base, **kw})


def test_training_on_tokens_learns(token_dir, tmp_path):
    directory, _ = token_dir
    loaded = tiny_loaded("llama", seed=2, vocab_size=VOCAB)
    corpus = token_corpus(directory)
    info = draft_training.train(loaded, corpus, tmp_path / "run", _cfg(epochs=6, lr=1e-2, eval_every=5),
                                progress=False)
    history = info["history"]
    assert history[0]["step"] == 0 and info["epochs_done"] == 6
    assert [h["step"] for h in history] == sorted(h["step"] for h in history)
    assert any(h["epoch"] not in range(7) for h in history)  # validations between epochs too
    assert history[-1]["val_loss"] < history[0]["val_loss"] - 0.5
    assert history[-1]["val_top1"] > history[0]["val_top1"] + 0.15  # the rule generalises to held-out prompts
    _, vocab_ids, _ = load_draft_dir(loaded.model, tmp_path / "run")
    assert EOS in vocab_ids.tolist() and len(vocab_ids) == 48


def _weights(loaded, directory) -> dict[str, torch.Tensor]:
    draft, _, _ = load_draft_dir(loaded.model, directory)
    return {k: v.clone() for k, v in trainable_state(draft.float()).items()}


def test_resume_continues_from_the_checkpoint(token_dir, tmp_path, monkeypatch):
    directory, _ = token_dir
    loaded = tiny_loaded("llama", seed=2, vocab_size=VOCAB)
    corpus = token_corpus(directory)
    cfg = _cfg(save_every=3)
    full = draft_training.train(loaded, corpus, tmp_path / "full", cfg, progress=False)
    steps = full["steps_done"]
    assert steps > 8
    calls = {"n": 0}
    real = draft_training.collate

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:  # killed during step 8: the last checkpoint is step 6
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(draft_training, "collate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        draft_training.train(loaded, corpus, tmp_path / "cut", _cfg(save_every=3), progress=False)
    monkeypatch.setattr(draft_training, "collate", real)
    saved = draft_training.json.loads((tmp_path / "cut" / "config.json").read_text())
    assert saved["steps_done"] == 6 and not (tmp_path / "cut" / ".partial").exists()
    resumed = draft_training.train(loaded, corpus, tmp_path / "cut", _cfg(save_every=3), resume=True,
                                   progress=False)
    assert resumed["steps_done"] == steps
    assert [h["step"] for h in resumed["history"]] == [h["step"] for h in full["history"]]
    a, b = _weights(loaded, tmp_path / "full"), _weights(loaded, tmp_path / "cut")
    for name in a:  # the same batches in the same order, the same optimizer state: the same weights
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-5)
    fresh = draft_training.train(loaded, corpus, tmp_path / "other", _cfg(epochs=1), progress=False)
    assert fresh["steps_done"] < steps


def test_init_from_a_saved_draft_takes_its_layers(token_dir, tmp_path):
    directory, _ = token_dir
    loaded = tiny_loaded("llama", seed=2, vocab_size=VOCAB)
    corpus = token_corpus(directory)
    first = draft_training.train(loaded, corpus, tmp_path / "first", _cfg(epochs=1, draft_vocab=40), progress=False)
    same = draft_training.train(loaded, corpus, tmp_path / "same", _cfg(epochs=1, draft_vocab=40), progress=False,
                                init=tmp_path / "first")
    assert same["history"][0]["val_top1"] == pytest.approx(first["history"][-1]["val_top1"])
    assert same["history"][0]["val_loss"] == pytest.approx(first["history"][-1]["val_loss"], rel=1e-5)
    wider = draft_training.train(loaded, corpus, tmp_path / "wider", _cfg(epochs=1, draft_vocab=56), progress=False,
                                 init=tmp_path / "first")
    assert wider["draft_vocab"] == 56 and wider["init_layers"] == first["init_layers"]
    start = _weights(loaded, tmp_path / "first")
    with pytest.raises(HastenError, match="no distilled draft"):
        draft_training.train(loaded, corpus, tmp_path / "x", _cfg(epochs=1), progress=False, init=tmp_path / "none")
    assert start  # the first draft is untouched by the runs that started from it
    torch.testing.assert_close(_weights(loaded, tmp_path / "first"), start)
