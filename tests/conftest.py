"""Shared fixtures: tiny seeded models (many fast runs) and the real default model (the real path)."""

from __future__ import annotations

import functools
import os
import tempfile

# Cost curves and converted tokenizers go to a fresh folder, never the user's cache (set before hasten loads).
os.environ.setdefault("HASTEN_CACHE", tempfile.mkdtemp(prefix="hasten-test-cache-"))

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from hasten.models import LoadedModel, load_model


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def device(request) -> str:
    """The devices a test taking ``device`` runs on: the CPU always, CUDA where a GPU is present."""
    return request.param


@pytest.fixture(autouse=True)
def _threads(request):
    """One thread for tiny models (threading overhead dominates them), two for the real model."""
    real = {"default_model", "default_model_hf"} & set(request.fixturenames)
    torch.set_num_threads(2 if real else 1)

EOS = 1
# Chat prompts for the exactness tests on the real default model: code, summarization, code with tests, a story.
DEFAULT_MODEL_PROMPTS = (
    "Write a Python function that returns the n-th Fibonacci number, with a docstring.",
    "Summarise in two sentences: The quick brown fox jumps over the lazy dog. The dog does not react.",
    "Write a Python function that checks whether a string is a palindrome, then test it on three words.",
    "Tell me a short story about a robot who learns to paint.",
)
TINY_CONFIGS = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "gemma": GemmaConfig,
    "mistral": MistralConfig,
    "qwen3": Qwen3Config,
    "gemma3_text": Gemma3TextConfig,
    "phi3": Phi3Config,
    "olmo2": Olmo2Config,
}


def tiny_model(arch: str = "llama", seed: int = 0, vocab_size: int = 64, layers: int = 2, hidden: int = 32,
               attn: str = "sdpa", init_std: float = 0.2):
    """A randomly initialised causal LM, small enough for hundreds of generations per second."""
    torch.manual_seed(seed)
    config = TINY_CONFIGS[arch](
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=256,
        bos_token_id=0, eos_token_id=EOS, pad_token_id=0, initializer_range=init_std,
        tie_word_embeddings=False, attn_implementation=attn,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_tokenizer(vocab_size: int = 64) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose token i is the word ``w{i}``."""
    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="w0", eos_token=f"w{EOS}", pad_token="w0")
    return fast


def tiny_loaded(arch: str = "llama", seed: int = 0, vocab_size: int = 64, **kwargs) -> LoadedModel:
    """A tiny model with its tokenizer, as the API takes them."""
    return LoadedModel(f"tiny-{arch}-{seed}", tiny_model(arch, seed, vocab_size, **kwargs), tiny_tokenizer(vocab_size))


def greedy_reference(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy ``generate`` output (new tokens only), stopping at EOS."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=EOS, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def default_reference(loaded: LoadedModel, prompt: str, max_new_tokens: int = 48) -> list[int]:
    """transformers' greedy ``generate`` on a chat prompt for a real model (new tokens only)."""
    from hasten.models import encode_prompt

    ids = encode_prompt(loaded.tokenizer, prompt)
    out = loaded.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(ids):].tolist()


def random_prompts(count: int, vocab_size: int = 64, seed: int = 0, repeat: bool = True) -> list[list[int]]:
    """Seeded prompts; with ``repeat`` half of each is a copy of an earlier stretch (so copying drafts can hit)."""
    gen = torch.Generator().manual_seed(seed)
    prompts = []
    for _ in range(count):
        length = int(torch.randint(6, 24, (1,), generator=gen))
        ids = torch.randint(2, vocab_size, (length,), generator=gen).tolist()
        if repeat:
            ids = ids + ids[: length // 2]
        prompts.append(ids)
    return prompts


@functools.cache
def _default(backend: str) -> LoadedModel:
    return load_model("default", backend)


@pytest.fixture(scope="session")
def default_model() -> LoadedModel:
    """The embedded SmolLM2-135M-Instruct on llama.cpp, its default backend (loaded once per test session)."""
    return _default("llamacpp")


@pytest.fixture(scope="session")
def default_model_hf() -> LoadedModel:
    """The embedded SmolLM2-135M-Instruct on transformers, dequantized to fp32 (loaded once per test session)."""
    return _default("transformers")


def exact_sequence_probs(model, prompt: list[int], probs, length: int,
                         eos: int | None = None) -> dict[tuple[int, ...], float]:
    """P(the first ``length`` new tokens) by enumeration, ``probs`` turning a row of logits into the sampling
    distribution; a sequence that reaches ``eos`` stops there."""
    out: dict[tuple[int, ...], float] = {}
    level: list[tuple[tuple[int, ...], float]] = [((), 1.0)]
    with torch.no_grad():
        for depth in range(length):
            rows = probs(model(torch.tensor([prompt + list(seq) for seq, _ in level])).logits[:, -1])
            following = []
            for (seq, p), row in zip(level, rows, strict=True):
                for token, q in enumerate(row.tolist()):
                    if q == 0.0:
                        continue
                    extended = (*seq, token)
                    if token == eos or depth == length - 1:
                        out[extended] = p * q
                    else:
                        following.append((extended, p * q))
            level = following
    return out
