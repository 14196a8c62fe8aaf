"""Self-distillation data, the draft trainer, and the shipped draft for ``--method draft``."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hasten.api import prompt_ids
from hasten.errors import HastenError
from hasten.training import selfdistill
from tests.conftest import greedy_reference, tiny_loaded

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
