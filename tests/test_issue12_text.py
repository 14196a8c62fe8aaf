"""Issue 12, item 7: mapping a stop string's character cut to the tokens whose text lies before it."""

from __future__ import annotations

import pytest
from conftest import tiny_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hasten.text import IncrementalDetokenizer

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


def reference(tokenizer, ids: list[int], cut: int) -> int:
    """The most leading tokens that decode to complete characters within ``text[:cut]``."""
    best = 0
    for n in range(len(ids) + 1):
        text = tokenizer.decode(ids[:n], skip_special_tokens=True)
        if "\ufffd" not in text and len(text) <= cut:
            best = n
    return best


def check_every_cut(tokenizer, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    expected = [reference(tokenizer, ids, cut) for cut in range(len(text) + 1)]
    for step in (1, 2, 3, 7):  # the chunks one decoding step hands over
        detok = IncrementalDetokenizer(tokenizer)
        for i in range(0, len(ids), step):
            detok.add(ids[i : i + step])
        assert [detok.tokens_before(cut) for cut in range(len(text) + 1)] == expected, step


def test_tokens_before_a_cut_with_multibyte_and_straddling_tokens():
    tokenizer = byte_tokenizer()
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert any(len(tokenizer.convert_ids_to_tokens(i)) > 1 for i in ids)  # merged tokens are there
    check_every_cut(tokenizer, TEXT)


def test_tokens_before_a_cut_on_word_tokens():
    tokenizer = tiny_tokenizer()
    detok = IncrementalDetokenizer(tokenizer)
    detok.add([3, 4])
    detok.add([5])  # text "w3 w4 w5"
    assert [detok.tokens_before(cut) for cut in (0, 1, 2, 3, 4, 5, 6, 8)] == [0, 0, 1, 1, 1, 2, 2, 3]


def test_a_token_completing_a_character_after_the_cut_is_not_counted():
    tokenizer = byte_tokenizer()
    ids = tokenizer("ab🚀", add_special_tokens=False)["input_ids"]  # a, b, then four bytes of the rocket
    detok = IncrementalDetokenizer(tokenizer)
    detok.add(ids)
    assert detok.tokens_before(2) == 2 and detok.tokens_before(3) == len(ids)


@pytest.mark.slow
def test_tokens_before_every_cut_with_the_real_tokenizer(default_model):
    text = "Héllo wörld! 你好，世界。\n    def f(x):\n        return x ** 2  # 🚀 done"
    check_every_cut(default_model.tokenizer, text)
