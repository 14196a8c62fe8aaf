"""The distilled draft (``hasten/artifacts/draft``) exported to GGUF, so that it runs as a llama.cpp context.

The file is a llama GGUF whose "vocabulary" is the draft's ``vocab_ids`` (no tokenizer), with the target's
output rows of those ids as its tied embedding/output table. llama.cpp is fed the target's input embedding of
each token (``llama_batch.embd``) instead of token ids, so the draft computes exactly what the torch draft
computes: the same layers, the same inputs, the same 8192-row head.

Layers go in ``f32``, ``f16`` (the stored precision: no loss) or ``q8_0``; the target's rows keep their own
quantized bytes. A file is written once per (artifact, target, weights) into the cache directory.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import gguf
import numpy as np
import torch

from hasten.backends.llamacpp.gguf_config import GGUFFile, read_gguf
from hasten.errors import HastenError

CACHE = Path(os.environ.get("HASTEN_CACHE", Path.home() / ".cache" / "hasten")) / "drafts"
WEIGHTS = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
           "q8_0": gguf.GGMLQuantizationType.Q8_0}
_FILE_TYPE = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
_LAYER_NAMES = {  # transformers name -> GGUF name, inside a layer
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
_COPIED_KEYS = ("context_length", "embedding_length", "feed_forward_length", "attention.head_count",
                "attention.head_count_kv", "attention.key_length", "attention.value_length", "rope.freq_base",
                "rope.dimension_count", "attention.layer_norm_rms_epsilon")


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """transformers' q/k rows (rotate-half rope) to llama.cpp's order, as llama.cpp's converter does."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def _matrix(writer: gguf.GGUFWriter, name: str, data: np.ndarray, weights: str) -> None:
    qtype = WEIGHTS[weights]
    if qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32 == 0:
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    else:
        writer.add_tensor(name, data.astype(np.float16 if qtype == gguf.GGMLQuantizationType.F16 else np.float32))


def _add_raw(writer: gguf.GGUFWriter, name: str, raw: np.ndarray, qtype: gguf.GGMLQuantizationType) -> None:
    """Stored bytes ``raw`` (rows, bytes per row) of type ``qtype`` as tensor ``name``, unchanged."""
    raw = np.ascontiguousarray(raw)
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        writer.add_tensor(name, raw.view(np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16))
    else:
        writer.add_tensor(name, raw, raw_dtype=qtype)


def _copy_raw(writer: gguf.GGUFWriter, name: str, file: GGUFFile, source: str, rows: np.ndarray | None) -> None:
    """The target's tensor ``source`` (its rows ``rows``, or all) with its quantized bytes unchanged."""
    raw = np.asarray(file.raw(source) if rows is None else file.raw(source)[rows])
    _add_raw(writer, name, raw, file.tensors[source].type)


def head_name(file: GGUFFile) -> str:
    """The target's output table: ``output.weight``, or the tied ``token_embd.weight``."""
    return "output.weight" if "output.weight" in file.tensors else "token_embd.weight"


def start_writer(path: Path, file: GGUFFile, name: str, layers: int, weights: str) -> gguf.GGUFWriter:
    """A llama GGUF writer for ``path`` with the draft's ``layers`` and the target's other hyper-parameters."""
    if weights not in WEIGHTS:
        raise HastenError(f"draft export: weights in {tuple(WEIGHTS)}")
    meta = file.metadata
    if meta.get("general.architecture") != "llama":
        raise HastenError("the distilled draft exports only onto a llama target")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_block_count(layers)
    writer.add_file_type(_FILE_TYPE[weights])
    for key in _COPIED_KEYS:
        if f"llama.{key}" in meta:
            value = meta[f"llama.{key}"]
            kind = gguf.GGUFValueType.FLOAT32 if isinstance(value, float) else gguf.GGUFValueType.UINT32
            writer.add_key_value(f"llama.{key}", value, kind)
    return writer


def draft_layers(tensors: dict[str, torch.Tensor]) -> list[int]:
    """The stored draft's layer indices, in order."""
    return sorted({int(name.split(".")[2]) for name in tensors if name.startswith("model.layers.")})


def write_layers(writer: gguf.GGUFWriter, tensors: dict[str, torch.Tensor], file: GGUFFile, weights: str) -> None:
    """The draft's layers (renumbered from 0, q/k permuted for llama.cpp) and final norm, then the file itself."""
    heads = int(file.metadata["llama.attention.head_count"])
    kv_heads = int(file.metadata.get("llama.attention.head_count_kv", heads))
    for i, layer in enumerate(draft_layers(tensors)):
        for hf, name in _LAYER_NAMES.items():
            data = tensors[f"model.layers.{layer}.{hf}.weight"].float().numpy()
            if name.endswith("norm"):
                writer.add_tensor(f"blk.{i}.{name}.weight", data.astype(np.float32))
                continue
            if name == "attn_q":
                data = _permute(data, heads)
            elif name == "attn_k":
                data = _permute(data, kv_heads)
            _matrix(writer, f"blk.{i}.{name}.weight", data, weights)
    writer.add_tensor("output_norm.weight", tensors["model.norm.weight"].float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export_draft(tensors: dict[str, torch.Tensor], vocab_ids: torch.Tensor, target: str | Path, out: str | Path,
                 weights: str = "f16") -> Path:
    """Write the draft (its stored ``tensors``: layers and final norm) on the target GGUF ``target`` to ``out``."""
    file = read_gguf(target)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(f".{os.getpid()}.part")
    writer = start_writer(partial, file, f"hasten distilled draft (reduced, {weights})", len(draft_layers(tensors)),
                          weights)
    writer.add_vocab_size(len(vocab_ids))
    writer.add_tokenizer_model("none")  # llama.cpp's no_vocab: ids are rows of the reduced head
    _copy_raw(writer, "token_embd.weight", file, head_name(file), vocab_ids.numpy())  # tied: no output.weight
    write_layers(writer, tensors, file, weights)
    partial.replace(out)
    return out


def cached_export(directory: str | Path, target: str | Path, weights: str = "f16", cache: Path | None = None
                  ) -> Path:
    """The draft in ``directory`` exported onto ``target``, from the cache when it was written before."""
    from hasten.draft.model import CONFIG, read_draft_dir
    from hasten.draft.model import WEIGHTS as STORED

    directory, target = Path(directory), Path(target)
    digest = hashlib.sha256()
    for part in (directory / STORED, directory / CONFIG):
        digest.update(part.read_bytes())
    stat = target.stat()
    digest.update(f"{target.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:reduced:{weights}:v1".encode())
    out = (cache or CACHE) / f"draft-{digest.hexdigest()[:20]}.gguf"
    if not out.is_file():
        tensors, vocab_ids, _ = read_draft_dir(directory)
        export_draft(tensors, vocab_ids, target, out, weights)
    return out


__all__ = ["CACHE", "WEIGHTS", "cached_export", "draft_layers", "export_draft", "head_name", "start_writer",
           "write_layers"]
