"""hasten's ``ar`` on llama.cpp equals llama-cpp-python's own greedy decoding (``Llama.generate`` at temperature 0,
no repetition penalty), token for token, on the default model and on Gemma 3 270M past its 512-token sliding window.

The reference ``Llama`` is built with the llama context hasten's backend makes: the same GGUF, context size,
threads, KV cache types (``type_k``/``type_v``), flash attention (hasten asks llama.cpp for AUTO, which is on for
the CPU), sliding-window layers keeping every cell (``swa_full``) and ``use_extra_bufts``. It feeds the prompt as
hasten does, in one ``llama_decode`` per ``n_batch`` tokens with ``n_ubatch = n_batch``: llama.cpp's logits can move
in their last bits with how a prompt is batched, so only the same batching is a fair comparison (at the time of
writing, batches of 64 and 100 gave the same tokens here too). hasten's other context settings (64 sequence ids, one
unified cell buffer) only tag cells for its trees. Slow: the real models.
"""

from __future__ import annotations

from typing import Any

import pytest
from test_gemma3 import SLIDING_WINDOW, code_prompt, needs_gemma3

from hasten.api import generate, prompt_ids
from hasten.models import GEMMA3_MODEL, LoadedModel, load_model

MAX_NEW_TOKENS = 48


def llamacpp_greedy(loaded: LoadedModel, ids: list[int], max_new_tokens: int, monkeypatch: pytest.MonkeyPatch,
                    kv_overrides: dict[str, Any] | None = None) -> list[int]:
    """llama-cpp-python's greedy tokens for ``ids`` (``max_new_tokens`` of them, end tokens included as any other)
    from a ``Llama`` set up as hasten's llama.cpp backend sets up its context (module docstring)."""
    import llama_cpp
    import llama_cpp.llama_cpp as low

    backend = loaded.backend
    keys, _, values = backend.kv_type.partition("/")  # "K/V", or one type for both
    values = values or keys
    real = low.llama_model_default_params
    extra_buffers = backend.extra_buffers  # hasten's choice for this model; Llama has no argument

    def model_params() -> Any:
        params = real()
        params.use_extra_bufts = extra_buffers
        return params

    with monkeypatch.context() as patch:
        patch.setattr(low, "llama_model_default_params", model_params)
        llama = llama_cpp.Llama(
            model_path=str(loaded.path), n_ctx=backend.max_context, n_batch=backend.n_batch,
            n_ubatch=backend.n_batch, n_threads=backend.threads, n_threads_batch=backend.threads,
            flash_attn=backend.flash_attn is not False, swa_full=True,
            type_k=getattr(low, f"GGML_TYPE_{keys.upper()}"), type_v=getattr(low, f"GGML_TYPE_{values.upper()}"),
            kv_overrides=kv_overrides, verbose=False)
    try:
        out: list[int] = []
        for token in llama.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            out.append(int(token))
            if len(out) == max_new_tokens:
                return out
        raise AssertionError("Llama.generate stopped early")
    finally:
        llama.close()


def hasten_ar(loaded: LoadedModel, ids: list[int], max_new_tokens: int) -> list[int]:
    """hasten's greedy ``ar`` tokens, which must run to the length (an early end token would shorten the check)."""
    result = generate(loaded, ids, "ar", max_new_tokens=max_new_tokens, temperature=0)
    assert result.finish_reason == "length" and len(result.token_ids) == max_new_tokens, result
    return result.token_ids


@pytest.mark.slow
def test_ar_equals_llamacpp_python_greedy_on_the_default_model(default_model, monkeypatch):
    assert default_model.backend.backend == "llamacpp"
    short = prompt_ids(default_model, [{"role": "user", "content": "Tell me a short story about a robot who paints."}])
    long = prompt_ids(default_model, [{"role": "user", "content": "Continue this module:\n\n" + code_prompt(18)}])
    assert len(long) > default_model.backend.n_batch  # a prefill in two llama_decode calls
    for ids in (short, long):
        tokens = hasten_ar(default_model, ids, MAX_NEW_TOKENS)
        assert tokens == llamacpp_greedy(default_model, ids, MAX_NEW_TOKENS, monkeypatch), len(ids)
        assert hasten_ar(default_model, ids, MAX_NEW_TOKENS) == tokens  # again, its prompt now in the prompt cache


@needs_gemma3
@pytest.mark.slow
def test_ar_equals_llamacpp_python_greedy_on_gemma3_past_the_window(monkeypatch):
    loaded = load_model(GEMMA3_MODEL, "llamacpp", threads=2)
    ids = prompt_ids(loaded, code_prompt(18), chat=False)  # raw text, as --no-chat
    assert SLIDING_WINDOW < len(ids) < loaded.backend.max_context - MAX_NEW_TOKENS
    tokens = hasten_ar(loaded, ids, MAX_NEW_TOKENS)
    assert tokens == llamacpp_greedy(loaded, ids, MAX_NEW_TOKENS, monkeypatch)
    # The window decides these tokens: with it widened past the context, llama.cpp writes others.
    unwindowed = llamacpp_greedy(loaded, ids, MAX_NEW_TOKENS, monkeypatch,
                                 kv_overrides={f"{loaded.backend.architecture}.attention.sliding_window": 8192})
    assert unwindowed != tokens
