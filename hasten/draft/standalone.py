"""The distilled draft as a standalone model in the target's full vocabulary, for servers other than hasten.

hasten's draft ships only its layers, final norm and the ``vocab_ids`` of its reduced head; the embeddings and head
rows are the target's. Here it becomes a complete llama model that any library loads next to the target:

- a transformers folder (``config.json`` for ``LlamaForCausalLM``, ``model.safetensors``, the target's tokenizer
  and ``generation_config.json``), for transformers' assisted generation or vLLM's draft-model speculation;
- a GGUF file (llama arch, the target's ``tokenizer.*`` metadata, its ``token_embd`` bytes unchanged), for
  llama.cpp's ``--model-draft``.

Input embeddings are the target's full table. The head is untied and full-size: the target's output rows at
``vocab_ids`` and zero rows elsewhere (logit 0 there), so its argmax is the reduced draft's whenever the best
in-vocabulary logit is above 0; a drafter only proposes, so what the target outputs is unchanged either way.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import save_file
from transformers import GenerationConfig, LlamaConfig, PreTrainedTokenizerBase

from hasten.backends.llamacpp.gguf_config import GGUFFile, llama_config, read_gguf
from hasten.draft.gguf_export import CACHE, _add_raw, _copy_raw, draft_layers, head_name, start_writer, write_layers
from hasten.draft.model import CONFIG, WEIGHTS, check_fits, read_draft_dir
from hasten.errors import HastenError

GGUF_NAME = "draft.gguf"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _inputs(draft: str | Path, target: str | Path) -> tuple[dict[str, torch.Tensor], torch.Tensor, GGUFFile]:
    """The draft's stored tensors and vocabulary ids, and the target GGUF, checked to fit each other."""
    if Path(target).suffix != ".gguf" or not Path(target).is_file():
        raise HastenError(f"export-draft needs the target as a .gguf file, got {target}")
    tensors, vocab_ids, info = read_draft_dir(draft)
    file = read_gguf(target)
    if file.metadata.get("general.architecture") != "llama":
        raise HastenError(f"the distilled draft exports only onto a llama target; {Path(target).name} is "
                          f"{file.metadata.get('general.architecture')!r}")
    vocab, hidden = file.tensors["token_embd.weight"].shape
    check_fits(info, vocab_ids, hidden, vocab, draft)
    return tensors, vocab_ids, file


def full_head(file: GGUFFile, vocab_ids: torch.Tensor) -> torch.Tensor:
    """The full-vocabulary head (V, H), float32: the target's output rows at ``vocab_ids``, zero rows elsewhere."""
    vocab, hidden = file.tensors["token_embd.weight"].shape
    head = torch.zeros(vocab, hidden)
    head[vocab_ids] = file.rows(head_name(file), vocab_ids.numpy())
    return head


def export_transformers(draft: str | Path, target: str | Path, tokenizer: PreTrainedTokenizerBase, out: str | Path,
                        dtype: torch.dtype = torch.float32) -> Path:
    """Write the draft on the target GGUF ``target`` to the folder ``out`` as a transformers ``LlamaForCausalLM``.

    Embeddings and head rows are dequantized as transformers' GGUF loader does, so in float32 the folder computes
    what hasten's draft computes on the transformers backend.
    """
    tensors, vocab_ids, file = _inputs(draft, target)
    layers = draft_layers(tensors)
    base = llama_config(file).to_dict()
    for key in ("num_hidden_layers", "tie_word_embeddings", "architectures", "dtype", "torch_dtype", "model_type",
                "transformers_version"):
        base.pop(key, None)
    config = LlamaConfig(**base, num_hidden_layers=len(layers), tie_word_embeddings=False,
                         architectures=["LlamaForCausalLM"], dtype=dtype)
    state = {"model.embed_tokens.weight": file.rows("token_embd.weight", None), "lm_head.weight":
             full_head(file, vocab_ids), "model.norm.weight": tensors["model.norm.weight"]}
    for i, layer in enumerate(layers):
        prefix = f"model.layers.{layer}."
        state.update({f"model.layers.{i}.{name[len(prefix):]}": value for name, value in tensors.items()
                      if name.startswith(prefix)})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({name: value.to(dtype).contiguous() for name, value in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    config.save_pretrained(out)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _copy_tokenizer_metadata(writer: gguf.GGUFWriter, target: Path) -> None:
    """Every ``tokenizer.*`` key of the target GGUF, strings as their stored bytes, so llama.cpp tokenizes alike."""
    for field in gguf.GGUFReader(target).fields.values():
        if not field.name.startswith("tokenizer."):
            continue
        kind = gguf.GGUFValueType(field.types[0])
        if kind == gguf.GGUFValueType.ARRAY:
            sub = gguf.GGUFValueType(field.types[-1])
            value = [bytes(field.parts[i]) for i in field.data] if sub == gguf.GGUFValueType.STRING \
                else field.contents()
            writer.add_key_value(field.name, value, kind, sub_type=sub)
        else:
            writer.add_key_value(field.name, bytes(field.parts[-1]) if kind == gguf.GGUFValueType.STRING
                                 else field.contents(), kind)


def export_gguf(draft: str | Path, target: str | Path, out: str | Path, weights: str = "f16") -> Path:
    """Write the draft on the target GGUF ``target`` to the GGUF file ``out``, full vocabulary and tokenizer.

    ``token_embd`` is the target's tensor as stored; ``output`` its stored rows at ``vocab_ids`` and zero bytes
    elsewhere (zero in every GGML type); the layers in ``weights`` (f32, f16 or q8_0).
    """
    tensors, vocab_ids, file = _inputs(draft, target)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(f".{os.getpid()}.part")
    writer = start_writer(partial, file, f"hasten distilled draft ({weights})", len(draft_layers(tensors)), weights)
    vocab = file.tensors["token_embd.weight"].shape[0]
    writer.add_vocab_size(vocab)
    _copy_tokenizer_metadata(writer, Path(target))
    _copy_raw(writer, "token_embd.weight", file, "token_embd.weight", None)
    head = head_name(file)
    stored = file.raw(head)
    rows = np.zeros_like(stored)
    rows[vocab_ids.numpy()] = stored[vocab_ids.numpy()]
    _add_raw(writer, "output.weight", rows, file.tensors[head].type)
    write_layers(writer, tensors, file, weights)
    partial.replace(out)
    return out


def export_standalone(draft: str | Path, target: str | Path, tokenizer: PreTrainedTokenizerBase, out: str | Path,
                      gguf_weights: str = "f16", dtype: torch.dtype = torch.float32) -> tuple[Path, Path]:
    """Both exports into ``out``: the transformers folder, and ``out/draft.gguf``; returns their paths."""
    _inputs(draft, target)  # every check before anything is written
    folder = export_transformers(draft, target, tokenizer, out, dtype)
    return folder, export_gguf(draft, target, folder / GGUF_NAME, gguf_weights)


def cached_transformers_export(draft: str | Path, target: str | Path, tokenizer: PreTrainedTokenizerBase,
                               cache: Path | None = None) -> Path:
    """The draft's float32 transformers folder on ``target``, from the cache when it was written before."""
    draft, target = Path(draft), Path(target)
    _inputs(draft, target)
    digest = hashlib.sha256()
    for part in (draft / WEIGHTS, draft / CONFIG):
        digest.update(part.read_bytes())
    stat = target.stat()
    digest.update(json.dumps([str(target.resolve()), stat.st_size, stat.st_mtime_ns, "standalone", "v1"]).encode())
    out = (cache or CACHE) / f"standalone-{digest.hexdigest()[:20]}"
    if not (out / "model.safetensors").is_file():
        partial = out.with_name(f"{out.name}.{os.getpid()}.part")
        shutil.rmtree(partial, ignore_errors=True)
        export_transformers(draft, target, tokenizer, partial)
        shutil.rmtree(out, ignore_errors=True)
        partial.rename(out)
    return out


__all__ = ["DTYPES", "GGUF_NAME", "cached_transformers_export", "export_gguf", "export_standalone",
           "export_transformers", "full_head"]
