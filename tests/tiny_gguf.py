"""Write tiny seeded random llama GGUF files that llama.cpp (and transformers) can load, in milliseconds."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

# Token 0 <unk>, 1 <s> (bos), 2 </s> (eos), 3 the newline byte llama.cpp's SPM loader looks for, then words.
SPECIALS = ["<unk>", "<s>", "</s>", "<0x0A>"]
EOS = 2
QTYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
          "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}


def write_tiny_gguf(path: str | Path, *, seed: int = 0, vocab_size: int = 96, hidden: int = 64, layers: int = 2,
                    heads: int = 4, kv_heads: int = 2, ffn: int = 128, context: int = 512, weights: str = "q8_0",
                    init_std: float = 0.25, tied: bool = False, architecture: str = "llama") -> Path:
    """A random llama-shaped model; 2-D weights in ``weights`` (f32, f16, q8_0, q4_0), norms in F32.

    ``architecture`` only renames the metadata (``general.architecture`` and its key prefix), which is how a
    file of an architecture llama.cpp does not know is made.
    """
    if vocab_size <= len(SPECIALS):
        raise ValueError(f"vocab_size must exceed {len(SPECIALS)}")
    rng = np.random.default_rng(seed)
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny-random-llama")
    writer.add_context_length(context)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab_size)
    writer.add_file_type(FILE_TYPES[weights])

    tokens = SPECIALS + [f"w{i}" for i in range(len(SPECIALS), vocab_size)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL, gguf.TokenType.BYTE]
    types += [gguf.TokenType.NORMAL] * (vocab_size - len(SPECIALS))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * vocab_size)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(EOS)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)

    def matrix(name: str, rows: int, cols: int) -> None:
        data = (rng.standard_normal((rows, cols)) * init_std).astype(np.float32)
        qtype = QTYPES[weights]
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            writer.add_tensor(name, gguf.quants.quantize(data, qtype))
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    def norm(name: str) -> None:
        writer.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))

    head_dim = hidden // heads
    matrix("token_embd.weight", vocab_size, hidden)
    for layer in range(layers):
        norm(f"blk.{layer}.attn_norm.weight")
        matrix(f"blk.{layer}.attn_q.weight", hidden, hidden)
        matrix(f"blk.{layer}.attn_k.weight", kv_heads * head_dim, hidden)
        matrix(f"blk.{layer}.attn_v.weight", kv_heads * head_dim, hidden)
        matrix(f"blk.{layer}.attn_output.weight", hidden, hidden)
        norm(f"blk.{layer}.ffn_norm.weight")
        matrix(f"blk.{layer}.ffn_gate.weight", ffn, hidden)
        matrix(f"blk.{layer}.ffn_up.weight", ffn, hidden)
        matrix(f"blk.{layer}.ffn_down.weight", hidden, ffn)
    # A final norm far from the identity, so that hidden states before and after it are easy to tell apart.
    writer.add_tensor("output_norm.weight", rng.uniform(-2.0, 2.0, hidden).astype(np.float32))
    if not tied:
        matrix("output.weight", vocab_size, hidden)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
