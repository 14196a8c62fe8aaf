"""``hasten export-draft``: the draft as a standalone full-vocabulary model that transformers and llama.cpp load.

Fast tests use a tiny GGUF target; the slow ones export the shipped draft onto the default model and run it as
transformers' assistant model and as llama-cpp-python's draft model, checking both outputs equal plain greedy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DEFAULT_MODEL_PROMPTS
from tiny_gguf import write_tiny_gguf

from hasten.cli import main
from hasten.draft.model import SHIPPED_DRAFT, build_draft, load_draft_dir, load_draft_on, save_draft
from hasten.draft.standalone import GGUF_NAME, export_gguf, export_standalone
from hasten.models import default_model_path, encode_prompt, load_model

VOCAB = 96
DRAFT_IDS = torch.arange(4, 68)
OUTSIDE = torch.tensor([i for i in range(VOCAB) if i not in set(DRAFT_IDS.tolist())])


def _llama(path, **kwargs):
    import llama_cpp

    from hasten.bench.anchors import _extra_buffers_as_hasten

    with _extra_buffers_as_hasten():
        return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, n_threads_batch=2, verbose=False,
                               **kwargs)


def _tokenizer_metadata(path) -> dict:
    import gguf

    fields = gguf.GGUFReader(path).fields.values()
    return {field.name: field.contents() for field in fields if field.name.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-export")
    path = write_tiny_gguf(folder / "target.gguf", weights="q8_0", vocab_size=VOCAB, seed=5)
    target = load_model(str(path), backend="transformers")
    save_draft(build_draft(target.model, DRAFT_IDS, [1]), DRAFT_IDS, folder / "draft", {"init_layers": [1]})
    export_standalone(folder / "draft", path, target.tokenizer, folder / "out")
    return target, folder


def test_tiny_export_computes_the_reduced_draft(tiny_export):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target, folder = tiny_export
    exported = AutoModelForCausalLM.from_pretrained(folder / "out", local_files_only=True).eval()
    assert exported.config.num_hidden_layers == 1 and exported.config.vocab_size == VOCAB
    assert not exported.config.tie_word_embeddings
    assert AutoTokenizer.from_pretrained(folder / "out").get_vocab() == target.tokenizer.get_vocab()
    reduced, _, _ = load_draft_on(target.backend, folder / "draft")
    context = torch.tensor([[1, 5, 9, 33, 70, 12, 8, 50, 20, 30]])  # 70 is outside the draft's vocabulary
    with torch.no_grad():
        full, expected = exported(context).logits[0], reduced(context).logits[0]
    assert torch.equal(full[:, DRAFT_IDS], expected)
    assert torch.equal(full[:, OUTSIDE], torch.zeros(len(context[0]), len(OUTSIDE)))


def test_tiny_gguf_runs_on_llamacpp(tiny_export):
    target, folder = tiny_export
    draft = _llama(folder / "out" / GGUF_NAME, logits_all=True)
    assert draft.n_vocab() == VOCAB
    assert _tokenizer_metadata(folder / "out" / GGUF_NAME) == _tokenizer_metadata(target.path)
    vocab = _llama(target.path, vocab_only=True)  # (the tiny vocabulary has no byte tokens to tokenize with)
    assert [draft.detokenize([i]) for i in range(VOCAB)] == [vocab.detokenize([i]) for i in range(VOCAB)]
    reduced, _, _ = load_draft_on(target.backend, folder / "draft")
    context = [1, 5, 9, 33, 70, 12, 8, 50, 20, 30]
    draft.eval(context)
    logits = torch.from_numpy(np.array(draft.scores[: len(context)]))
    with torch.no_grad():
        expected = reduced(torch.tensor([context])).logits[0]
    assert (logits[:, DRAFT_IDS] - expected).abs().max() < 0.1  # llama.cpp: Q8_0 head rows, f16 layers
    assert torch.equal(logits[:, DRAFT_IDS].argmax(-1), expected.argmax(-1))
    assert logits[:, OUTSIDE].abs().max() == 0


@pytest.mark.parametrize("args, message", [
    (["--draft", "{tmp}/missing"], "is not a folder"),
    (["--draft", "{tmp}"], "holds no distilled draft"),
    (["--target", "{tmp}/missing.gguf"], "not found"),
    (["--target", "{tmp}/config.json"], "is a file but not a .gguf model"),
    (["--target", "{small}"], "was not trained for this target"),
])
def test_bad_input_is_one_line(args, message, tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    small = write_tiny_gguf(tmp_path / "small.gguf", vocab_size=VOCAB)
    argv = [arg.format(tmp=tmp_path, small=small) for arg in args]
    assert main(["export-draft", *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("hasten: error: ") and message in err[-1]
    assert not (tmp_path / "out").exists()


# ---- the shipped draft on the default model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(default_model_hf, tmp_path_factory):
    """The shipped draft exported onto the default GGUF (f16 GGUF layers), and an f32 GGUF beside it."""
    out = tmp_path_factory.mktemp("export") / "draft"
    assert main(["export-draft", "--out", str(out)]) == 0
    export_gguf(SHIPPED_DRAFT, default_model_path(), out / "draft-f32.gguf", "f32")
    return out


@pytest.fixture(scope="module")
def teacher_forced(default_model_hf) -> list[list[int]]:
    """Each default prompt followed by the target's own greedy answer (what a drafter sees while decoding)."""
    sequences = []
    for prompt in DEFAULT_MODEL_PROMPTS:
        ids = encode_prompt(default_model_hf.tokenizer, prompt)
        inputs = torch.tensor([ids])
        with torch.no_grad():
            out = default_model_hf.model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=32,
                                                  do_sample=False)
        sequences.append(out[0].tolist())
    return sequences


@pytest.mark.slow
def test_transformers_export_argmax_is_the_reduced_drafts(exported, default_model_hf, teacher_forced):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(exported, local_files_only=True).eval()
    assert torch.equal(model.model.embed_tokens.weight, default_model_hf.model.get_input_embeddings().weight)
    reduced, vocab_ids, _ = load_draft_dir(default_model_hf.model, SHIPPED_DRAFT)
    outside = torch.ones(model.config.vocab_size, dtype=torch.bool)
    outside[vocab_ids] = False
    positions = 0
    for ids in teacher_forced:
        with torch.no_grad():
            full, small = model(torch.tensor([ids])).logits[0], reduced(torch.tensor([ids])).logits[0]
        assert torch.equal(full[:, vocab_ids], small)
        assert not full[:, outside].any()
        assert (small.max(-1).values > 0).all()  # the condition under which the argmaxes agree ...
        assert torch.equal(full.argmax(-1), vocab_ids[small.argmax(-1)])  # ... and they do, at every position
        positions += len(ids)
    assert positions > 200


@pytest.mark.slow
def test_transformers_assisted_generation_equals_greedy(exported, default_model_hf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assistant = AutoModelForCausalLM.from_pretrained(exported, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported, local_files_only=True)
    target = default_model_hf.model
    for prompt in DEFAULT_MODEL_PROMPTS[:3]:
        ids = encode_prompt(default_model_hf.tokenizer, prompt)
        assert encode_prompt(tokenizer, prompt) == ids
        inputs = torch.tensor([ids])
        settings = {"attention_mask": torch.ones_like(inputs), "max_new_tokens": 48, "do_sample": False}
        with torch.no_grad():
            plain = target.generate(inputs, **settings)
            assisted = target.generate(inputs, assistant_model=assistant, **settings)
        assert assisted.tolist() == plain.tolist()


@pytest.mark.slow
def test_gguf_tokenizes_like_the_target_and_agrees_with_the_transformers_export(exported, teacher_forced):
    from transformers import AutoModelForCausalLM

    text = "<|im_start|>user\nÜnïcödé, café; def f(x):\n    return x ** 2  # 3.14<|im_end|>".encode()
    target = _llama(default_model_path(), vocab_only=True)
    model = AutoModelForCausalLM.from_pretrained(exported, local_files_only=True).eval()
    for name in (GGUF_NAME, "draft-f32.gguf"):
        draft = _llama(exported / name, logits_all=True)
        assert draft.n_vocab() == model.config.vocab_size
        assert draft.tokenize(text, special=True) == target.tokenize(text, special=True)
        agree = total = 0
        for ids in teacher_forced:
            draft.reset()
            draft.eval(ids)
            with torch.no_grad():
                expected = model(torch.tensor([ids])).logits[0].argmax(-1).numpy()
            agree += int((np.array(draft.scores[: len(ids)]).argmax(-1) == expected).sum())
            total += len(ids)
        # Not exact even in f32: llama.cpp multiplies the Q8_0 head with Q8_0-quantized activations
        assert agree / total >= 0.95, (name, agree, total)


@pytest.mark.slow
def test_llamacpp_speculative_decoding_with_the_gguf_equals_greedy(exported, default_model_hf):
    from llama_cpp.llama_speculative import LlamaDraftModel

    class GreedyDraft(LlamaDraftModel):
        """Drafts ``k`` tokens greedily with the exported GGUF (llama-cpp-python reuses the cached prefix)."""

        def __init__(self, path, k: int = 4) -> None:
            self.llama, self.k, self.proposed = _llama(path), k, 0

        def __call__(self, input_ids, /, **kwargs):
            out = []
            for token in self.llama.generate(input_ids.tolist(), top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                                             repeat_penalty=1.0):
                out.append(token)
                if len(out) == self.k:
                    break
            self.proposed += len(out)
            return np.array(out, dtype=np.intc)

    drafter = GreedyDraft(exported / GGUF_NAME)
    speculative = _llama(default_model_path(), draft_model=drafter)
    plain = _llama(default_model_path())
    greedy = {"max_tokens": 48, "temperature": 0.0, "top_k": 1, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0}
    passes = tokens = 0
    for prompt in DEFAULT_MODEL_PROMPTS[:3]:
        ids = encode_prompt(default_model_hf.tokenizer, prompt)
        spec_tokens, spec_passes = _completion(speculative, ids, greedy)
        plain_tokens, _ = _completion(plain, ids, greedy)
        assert spec_tokens == plain_tokens and len(plain_tokens) > 8
        passes, tokens = passes + spec_passes, tokens + len(spec_tokens)
    assert drafter.proposed > 0
    assert passes < tokens  # drafted tokens were accepted: fewer target passes than tokens


def _completion(llama, ids: list[int], settings: dict) -> tuple[list[int], int]:
    """The tokens ``create_completion`` samples on the prompt ``ids``, and its target passes (``eval`` calls)."""
    sampled, passes = [], 0
    real_sample, real_eval = llama.sample, llama.eval

    def sample(*args, **kwargs):
        sampled.append(real_sample(*args, **kwargs))
        return sampled[-1]

    def evaluate(batch):
        nonlocal passes
        passes += 1
        real_eval(batch)

    llama.sample, llama.eval = sample, evaluate
    try:
        llama.create_completion(prompt=ids, **settings)
    finally:
        llama.sample, llama.eval = real_sample, real_eval
    return sampled[: settings["max_tokens"]], passes


@pytest.mark.slow
def test_bench_hf_assisted_runs_with_the_export(exported, default_model_hf):
    from hasten.bench.anchors import anchor_available, run_hf_anchor
    from hasten.methods import load_draft
    from hasten.sampling import SamplingParams

    ids = encode_prompt(default_model_hf.tokenizer, DEFAULT_MODEL_PROMPTS[0])
    plain = run_hf_anchor("hf_generate", default_model_hf, ids, 32, SamplingParams())
    given = load_draft(default_model_hf, str(exported))  # hasten bench --draft-model OUT
    for draft in (given, None):  # None: the shipped draft, exported into the cache
        assert anchor_available("hf_assisted", default_model_hf, draft) is None
        assisted = run_hf_anchor("hf_assisted", default_model_hf, ids, 32, SamplingParams(), draft)
        assert assisted.token_ids == plain.token_ids
        assert assisted.target_passes < plain.target_passes  # drafted tokens were accepted
