"""Incremental detokenization reproduces the one-shot decode of the real model's tokenizer."""

import pytest

from hasten.text import IncrementalDetokenizer


@pytest.mark.slow
def test_incremental_text_equals_full_decode(default_model):
    tokenizer = default_model.tokenizer
    text = "Héllo wörld! 你好，世界。  Indented:\n    def f(x):\n        return x ** 2  # ünïcödé 🚀 done"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for step in (1, 2, 3, 7):
        detok = IncrementalDetokenizer(tokenizer)
        pieces = [detok.add(ids[i : i + step]) for i in range(0, len(ids), step)]
        pieces.append(detok.flush())
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == detok.text
        assert all("\ufffd" not in piece for piece in pieces)
