"""Incremental detokenization: it reproduces the one-shot decode, and maps a stop string's character cut to the
tokens that make up the text before it."""

from __future__ import annotations

import pytest
from conftest import tiny_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

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


# Stop strings: the tokens whose text reaches (``straddling``) or stays within a character cut.

TEXT = "hello! é🚀 hell, héllo 你好 hello"


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE: one token per byte (so é and 🚀 span tokens) plus merged tokens that straddle letters."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {char: i for i, char in enumerate(sorted(alphabet))}
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "hell")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab, merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def reference(tokenizer, ids: list[int], cut: int, straddling: bool) -> int:
    """Brute force: the fewest leading tokens whose complete text reaches the cut (``straddling``), or the most
    whose complete text stays within it."""
    counts = []
    for n in range(len(ids) + 1):
        text = tokenizer.decode(ids[:n], skip_special_tokens=True)
        if "\ufffd" not in text and (len(text) >= cut if straddling else len(text) <= cut):
            counts.append(n)
    return min(counts, default=len(ids)) if straddling else max(counts)


def check_every_cut(tokenizer, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    cuts = range(len(text) + 1)
    for straddling in (True, False):
        expected = [reference(tokenizer, ids, cut, straddling) for cut in cuts]
        for step in (1, 2, 3, 7):  # the chunks one decoding step hands over
            detok = IncrementalDetokenizer(tokenizer)
            for i in range(0, len(ids), step):
                detok.add(ids[i : i + step])
            assert [detok.tokens_until(cut, straddling) for cut in cuts] == expected, (straddling, step)


def test_tokens_until_a_cut_with_multibyte_and_straddling_tokens():
    tokenizer = byte_tokenizer()
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert any(len(tokenizer.convert_ids_to_tokens(i)) > 1 for i in ids)  # merged tokens are there
    check_every_cut(tokenizer, TEXT)


def test_tokens_until_a_cut_on_word_tokens():
    tokenizer = tiny_tokenizer()
    detok = IncrementalDetokenizer(tokenizer)
    detok.add([3, 4])
    detok.add([5])  # text "w3 w4 w5"
    cuts = (0, 1, 2, 3, 4, 5, 6, 8)
    assert [detok.tokens_until(cut) for cut in cuts] == [0, 1, 1, 2, 2, 2, 3, 3]
    assert [detok.tokens_until(cut, straddling=False) for cut in cuts] == [0, 0, 1, 1, 1, 2, 2, 3]


def test_a_character_split_over_tokens_counts_all_or_none_of_them():
    tokenizer = byte_tokenizer()
    ids = tokenizer("ab🚀X", add_special_tokens=False)["input_ids"]  # a, b, four bytes of the rocket, X
    detok = IncrementalDetokenizer(tokenizer)
    detok.add(ids)
    for straddling in (True, False):
        assert detok.tokens_until(2, straddling) == 2  # the rocket starts at the cut: none of its bytes
        assert detok.tokens_until(3, straddling) == 6  # the rocket ends at the cut: all four


@pytest.mark.slow
def test_tokens_until_every_cut_with_the_real_tokenizer(default_model):
    text = "Héllo wörld! 你好，世界。\n    def f(x):\n        return x ** 2  # 🚀 done"
    check_every_cut(default_model.tokenizer, text)
