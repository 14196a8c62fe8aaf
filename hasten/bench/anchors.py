"""Other libraries' own decoding as reference rows, on the same loaded model file and prompts.

- transformers (on a model loaded on the transformers backend, on its device and dtype): plain ``generate``
  (``hf_generate``), its prompt lookup (``hf_pld``), its assisted generation (``hf_assisted``: the
  ``--draft-model``, else the shipped draft exported as ``hasten export-draft`` does, cached) and plain greedy
  over its static KV cache (``hf_static``). On CUDA transformers compiles that static-cache decoding with
  ``torch.compile`` (mode ``reduce-overhead``: CUDA graphs), the fastest plain decoding it offers; on a CPU it
  compiles nothing (its automatic compilation is for accelerators only), so there ``hf_static`` is the static
  cache run eagerly: it still runs, and ``static_mode`` says which of the two a run measured.
- llama-cpp-python (on a model loaded on the llama.cpp backend): the high-level ``Llama.create_completion``
  greedy (``llamacpp_generate``) and with ``LlamaPromptLookupDecoding`` (``llamacpp_pld``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from hasten.adaptive.cost import clock_for
from hasten.backends.transformers.generate import Generated, generate_ids, generation_config
from hasten.errors import HastenError
from hasten.models import LoadedModel
from hasten.sampling import SamplingParams

HF_ANCHORS = ("hf_generate", "hf_pld", "hf_assisted", "hf_static")
LLAMACPP_ANCHORS = ("llamacpp_generate", "llamacpp_pld")
ANCHORS = (*HF_ANCHORS, *LLAMACPP_ANCHORS)
HF_PLD_TOKENS = 10
LLAMACPP_PLD_TOKENS = 10


@dataclass
class AnchorOutput:
    """New token ids, how many forward passes of the target produced them (prefill included) and the prefill's
    time: the target's pass over the prompt, the one that yields the first new token (None: not measured)."""

    token_ids: list[int]
    target_passes: int
    prefill_s: float | None = None


def anchor_backend(name: str) -> str:
    """The backend an anchor's model must be loaded on."""
    return "llamacpp" if name in LLAMACPP_ANCHORS else "transformers"


def anchor_available(name: str, loaded: LoadedModel | None, draft: LoadedModel | None) -> str | None:
    """Why the anchor ``name`` cannot run on ``loaded`` (its backend's model, None if none), or None if it can."""
    backend = anchor_backend(name)
    if loaded is None:
        how = "--backend transformers or --compare-backend transformers" if backend == "transformers" \
            else "a .gguf model with --backend llamacpp or --compare-backend llamacpp"
        return f"{name} needs the model on the {backend} backend: {how}"
    if name == "hf_assisted":
        if draft is None:
            try:
                draft = shipped_assistant(loaded)
            except HastenError as error:
                return f"hf_assisted needs a draft model (--draft-model): {error}"
        if draft.backend.backend != "transformers":
            return "hf_assisted needs a draft model on transformers (a model folder)"
        if draft.model.device != loaded.model.device:
            return f"hf_assisted needs the draft on the target's device {loaded.model.device}, not {draft.model.device}"
    if backend == "llamacpp":
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            return f"{name} needs llama-cpp-python"
    return None


_ASSISTANTS: dict[tuple[str, str, torch.dtype], LoadedModel] = {}


def shipped_assistant(loaded: LoadedModel) -> LoadedModel:
    """The shipped draft as a full-vocabulary transformers model on ``loaded``'s GGUF, device and dtype (exported
    once into the cache, as ``hasten export-draft`` writes it)."""
    from hasten.draft.model import SHIPPED_DRAFT
    from hasten.draft.standalone import cached_transformers_export
    from hasten.methods import load_draft

    if loaded.path is None or loaded.path.suffix != ".gguf":
        raise HastenError("the shipped draft is exported onto a .gguf target only")
    key = (str(loaded.path), str(loaded.model.device), loaded.model.dtype)
    if key not in _ASSISTANTS:
        folder = cached_transformers_export(SHIPPED_DRAFT, loaded.path, loaded.tokenizer)
        _ASSISTANTS[key] = load_draft(loaded, str(folder))
    return _ASSISTANTS[key]


def static_mode(loaded: LoadedModel) -> str:
    """How ``hf_static`` decodes on this model's device: compiled (CUDA graphs) on an accelerator, else eager."""
    if loaded.model.device.type == "cpu":
        return "eager (transformers compiles its static cache on accelerators only)"
    return "torch.compile, mode reduce-overhead (CUDA graphs)"


def run_hf_anchor(name: str, loaded: LoadedModel, ids: list[int], max_new_tokens: int, params: SamplingParams,
                  draft: LoadedModel | None = None) -> AnchorOutput:
    """Run transformers' ``model.generate`` the way the anchor ``name`` says (behind the backend's
    ``generate_ids``): its target forward calls counted and the first one, the prefill, timed.

    ``hf_static`` is counted without a hook (none inside compiled code): plain greedy decoding makes one forward
    pass per new token, the prefill giving the first. Its failures (a compiler missing, say) become a
    ``HastenError``, recorded as that run's error.
    """
    tokenizer = loaded.tokenizer
    eos = sorted(loaded.eos_token_ids) or None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    if name == "hf_static":
        try:
            out = _generate(loaded, ids, generation_config(max_new_tokens, params, eos, pad, static=True),
                            seed=params.seed, count=False)
        except Exception as error:  # torch.compile fails in many ways: the bench records which
            raise HastenError(f"hf_static failed: {type(error).__name__}: {str(error).splitlines()[0]}") from error
        return AnchorOutput(out.token_ids, len(out.token_ids), out.prefill_s)
    if name not in ("hf_generate", "hf_pld", "hf_assisted"):
        raise ValueError(f"unknown anchor {name!r}")
    config = generation_config(max_new_tokens, params, eos, pad,
                               prompt_lookup=HF_PLD_TOKENS if name == "hf_pld" else None)
    assistant = (draft or shipped_assistant(loaded)).model if name == "hf_assisted" else None
    out = _generate(loaded, ids, config, assistant=assistant, seed=params.seed)
    return AnchorOutput(out.token_ids, out.forward_calls or 0, out.prefill_s)


def _generate(loaded: LoadedModel, ids: list[int], config: Any, *, assistant: Any = None, seed: int | None = None,
              count: bool = True) -> Generated:
    """One ``generate`` call on ``loaded``'s model, timed with its backend's device clock."""
    clock = clock_for(getattr(loaded.backend, "device", "cpu"))
    return generate_ids(loaded.model, ids, config, clock, assistant=assistant, seed=seed, count=count)


@contextlib.contextmanager
def _extra_buffers_as_hasten(enabled: bool | None = None) -> Iterator[None]:
    """Load with hasten's llama.cpp backend's choice of ``use_extra_bufts``: ``enabled`` where the loaded model
    says (its backend's ``extra_buffers``: off where wide passes would not be batch-invariant), else off on AMX
    CPUs, whose batched AMX kernels crash in this build, and on elsewhere. The high-level ``Llama`` does not
    expose the setting."""
    import llama_cpp.llama_cpp as low

    real = low.llama_model_default_params
    if enabled is None:
        enabled = b"AMX_INT8 = 1" not in low.llama_print_system_info()

    def params() -> Any:
        made = real()
        made.use_extra_bufts = enabled
        return made

    low.llama_model_default_params = params
    try:
        yield
    finally:
        low.llama_model_default_params = real


class LlamaCppAnchor:
    """One ``llama_cpp.Llama`` (built once, on the GGUF file of ``loaded``, with its thread count and context),
    run through ``create_completion`` on token ids; the tokens it samples and its ``eval`` calls are recorded, and
    the prefill's time: from its first ``eval`` (the whole prompt, after ``reset``) to its first sampled token
    (sampling waits for the pass, which llama.cpp may return from before a device finishes it)."""

    def __init__(self, name: str, loaded: LoadedModel) -> None:
        if name not in LLAMACPP_ANCHORS:
            raise ValueError(f"unknown anchor {name!r}")
        if loaded.path is None or not loaded.path.is_file():
            raise HastenError(f"{name} needs the model's .gguf file")
        import llama_cpp
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        self.name = name
        self.threads = getattr(loaded.backend, "threads", None) or torch.get_num_threads()
        draft = LlamaPromptLookupDecoding(num_pred_tokens=LLAMACPP_PLD_TOKENS) if name == "llamacpp_pld" else None
        with _extra_buffers_as_hasten(getattr(loaded.backend, "extra_buffers", None)):
            self.llama = llama_cpp.Llama(model_path=str(loaded.path), n_threads=self.threads,
                                         n_threads_batch=self.threads, n_ctx=loaded.max_context, verbose=False,
                                         draft_model=draft)
        self._sampled: list[int] = []
        self._evals = 0
        self._prefill_began: float | None = None
        self._prefill_s: float | None = None
        real_generate, real_eval = self.llama.generate, self.llama.eval

        def generate(*args: Any, **kwargs: Any) -> Iterator[int]:
            for token in real_generate(*args, **kwargs):
                if not self._sampled and self._prefill_began is not None:
                    self._prefill_s = time.perf_counter() - self._prefill_began
                self._sampled.append(int(token))
                yield token

        def evaluate(tokens: Any) -> None:
            if not self._evals:
                self._prefill_began = time.perf_counter()
            self._evals += 1
            real_eval(tokens)

        # create_completion samples through self.generate and self.eval: shadow them on this object
        setattr(self.llama, "generate", generate)  # noqa: B010
        setattr(self.llama, "eval", evaluate)  # noqa: B010

    def run(self, ids: list[int], max_new_tokens: int, params: SamplingParams) -> AnchorOutput:
        """One completion from a fresh state (no prefix reuse, like hasten): new ids, end token included."""
        if not ids:
            raise HastenError("the prompt is empty")
        self.llama.reset()
        self._sampled, self._evals = [], 0
        self._prefill_began = self._prefill_s = None
        if params.greedy:
            sampling: dict[str, Any] = {"temperature": 0.0, "top_k": 1, "top_p": 1.0}
        else:
            sampling = {"temperature": params.temperature, "top_k": params.top_k, "top_p": params.top_p,
                        "seed": params.seed}
        self.llama.create_completion(prompt=list(ids), max_tokens=max_new_tokens, min_p=0.0, repeat_penalty=1.0,
                                     **sampling)
        return AnchorOutput(self._sampled[:max_new_tokens], self._evals, self._prefill_s)

    def close(self) -> None:
        self.llama.close()
