"""Structured output through llguidance: which tokens a JSON schema, a regular expression or a grammar allows.

``compile_constraint`` turns a request's ``response_format`` (OpenAI's shapes), ``regex`` or ``grammar`` (Lark,
as llguidance reads it) into a ``Grammar``; ``Grammar.matcher()`` starts one sequence's ``GrammarState``. JSON
is written compactly (``", "`` between items, ``": "`` after keys), which leaves keys and punctuation forced:
those are the tokens ``forced()`` offers as a near-certain draft.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.hf
import llguidance.torch
import numpy as np
import torch

from hasten.errors import HastenError
from hasten.response_format import check_response_format

_JSON_LAYOUT = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
# by (id(tokenizer), vocab size); each entry holds its tokenizer, so that id is not reused while the entry lives
_TOKENIZERS: dict[tuple[int, int], tuple[Any, llguidance.LLTokenizer]] = {}
_BUILDING = threading.Lock()  # one build per tokenizer, whichever thread asks first


def grammar_tokenizer(tokenizer: Any, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's view of a transformers tokenizer, built once per tokenizer (0.5 s for the default model's 49k
    vocabulary, 4 s for Gemma 3's 262k): the first constrained request pays it unless this is called before."""
    key = (id(tokenizer), vocab_size)
    with _BUILDING:
        if key not in _TOKENIZERS:
            try:
                _TOKENIZERS[key] = (tokenizer, llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size))
            except (ValueError, TypeError, AttributeError) as error:
                raise HastenError("structured output is not available for this model's tokenizer: "
                                  f"{_one_line(error)}") from None
        return _TOKENIZERS[key][1]


def _schema_grammar(schema: Mapping[str, Any]) -> str:
    layout = {**_JSON_LAYOUT, **schema.get("x-guidance", {})}
    return llguidance.LLMatcher.grammar_from_json_schema(json.dumps({**schema, "x-guidance": layout}))


def _response_format_grammar(response_format: object) -> str | None:
    """The grammar of an OpenAI ``response_format`` (None for plain text), once ``check_response_format`` took it."""
    checked = check_response_format(response_format)
    if checked["type"] == "text":
        return None
    if checked["type"] == "json_object":
        return _schema_grammar({"type": "object"})
    return _schema_grammar(checked["json_schema"]["schema"])


@dataclass(frozen=True)
class Grammar:
    """A compiled constraint for one tokenizer; ``matcher()`` starts a sequence at its beginning."""

    text: str
    tokenizer: llguidance.LLTokenizer
    vocab_size: int

    def matcher(self) -> GrammarState:
        return GrammarState(llguidance.LLMatcher(self.tokenizer, self.text), self.vocab_size)


def compile_constraint(tokenizer: Any, vocab_size: int, response_format: object = None, regex: str | None = None,
                       grammar: str | None = None) -> Grammar | None:
    """The one constraint a request asks for (None when it asks for none); a bad one is a ``HastenError``."""
    given = [name for name, value in (("response_format", response_format), ("regex", regex), ("grammar", grammar))
             if value is not None and not (name == "response_format" and value == {"type": "text"})]
    if len(given) > 1:
        raise HastenError(f"give one of response_format, regex and grammar, not {' and '.join(given)}")
    if not given:
        return None
    try:
        if response_format is not None:
            text = _response_format_grammar(response_format)
        elif regex is not None:
            if not isinstance(regex, str):
                raise HastenError("regex must be a string")
            text = llguidance.LLMatcher.grammar_from_regex(regex)
        else:
            if not isinstance(grammar, str):
                raise HastenError("grammar must be a string (Lark syntax)")
            text = llguidance.LLMatcher.grammar_from_lark(grammar)
    except (ValueError, TypeError) as error:  # llguidance's own parse errors
        raise HastenError(f"{given[0]} is invalid: {_one_line(error)}") from None
    if text is None:
        return None
    compiled = Grammar(text, grammar_tokenizer(tokenizer, vocab_size), vocab_size)
    probe = llguidance.LLMatcher(compiled.tokenizer, text)
    if probe.is_error():
        raise HastenError(f"{given[0]} is invalid: {_one_line(probe.get_error())}")
    return compiled


def _one_line(error: object) -> str:
    return " ".join(str(error).split())[:300]


class GrammarState:
    """One sequence's position in its grammar: the committed answer plus a tentative path below it.

    ``allowed(path)`` is the mask after the committed tokens and ``path``; the matcher follows the path asked
    for (rolling back to the common prefix), so walking down a tree costs one token per level.
    """

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.path: list[int] = []  # tokens consumed past the committed answer
        self._bitmask = llguidance.torch.allocate_token_bitmask(1, vocab_size)
        self._masks: dict[tuple[int, ...], torch.Tensor] = {}  # path -> mask, until the next commit
        self._placed: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}  # the same, copied to a device

    def _follow(self, path: Sequence[int]) -> None:
        """Move the matcher to the committed answer plus ``path`` (a path the grammar allows)."""
        common = 0
        while common < min(len(path), len(self.path)) and path[common] == self.path[common]:
            common += 1
        if common < len(self.path):
            self.matcher.rollback(len(self.path) - common)
            del self.path[common:]
        for token in path[common:]:
            if not self.matcher.consume_token(token):
                raise HastenError(f"the grammar rejects token {token}: {_one_line(self.matcher.get_error())}")
            self.path.append(token)

    def allowed(self, path: Sequence[int] = (), device: torch.device | str = "cpu") -> torch.Tensor:
        """The tokens the grammar allows after the committed answer and ``path`` (bool, vocabulary-sized), on
        ``device``: made once per path, and copied once per path and device, until the next ``commit``."""
        key = tuple(path)
        if key not in self._masks:
            self._follow(path)
            llguidance.torch.fill_next_token_bitmask(self.matcher, self._bitmask, 0)
            self._masks[key] = _unpack(self._bitmask[0], self.vocab_size)
        device = torch.device(device)
        if device.type == "cpu":
            return self._masks[key]
        if (key, device) not in self._placed:
            self._placed[key, device] = self._masks[key].to(device)
        return self._placed[key, device]

    def accepts(self, path: Sequence[int], token: int) -> bool:
        """Whether the grammar allows ``token`` after the committed answer and ``path`` (a path it allows). The
        matcher moves from the last path asked for, so a walk down a tree checks about one token per node."""
        self._follow(path)
        return self.matcher.validate_tokens([token]) == 1

    def forced(self, limit: int) -> list[int]:
        """Tokens the grammar forces next (at most ``limit``): drafted without a proposer, verified as usual."""
        self._follow(())
        return list(self.matcher.compute_ff_tokens())[: max(limit, 0)]

    def commit(self, tokens: Sequence[int]) -> None:
        """Tokens added to the answer (the tentative path is dropped first)."""
        self._follow(())
        self._masks.clear()
        self._placed.clear()
        for token in tokens:
            if self.matcher.is_stopped():  # after the grammar's end only the end of sequence follows
                break
            if not self.matcher.consume_token(token):
                raise HastenError(f"the grammar rejects token {token}: {_one_line(self.matcher.get_error())}")


def _unpack(bits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """llguidance's packed int32 bitmask (bit ``i % 32`` of word ``i // 32``) as one bool per token."""
    unpacked = np.unpackbits(bits.numpy().view(np.uint8), bitorder="little")[:vocab_size]
    return torch.from_numpy(unpacked.astype(bool))
