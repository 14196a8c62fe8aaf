"""Incremental detokenization: new text per step in time independent of the answer's length so far."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas (the sliding-window method vLLM uses).

    Each step decodes only the last few tokens: the ones already shown (for context, so word-boundary spaces
    come out right) and the new ones. A delta ending in an incomplete UTF-8 character is held back.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.text = ""
        self._prefix = 0  # start of the context window
        self._read = 0  # tokens whose text is already in ``self.text``

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, new_tokens: list[int]) -> str:
        """Append tokens; return the text they complete (possibly empty)."""
        self.tokens.extend(new_tokens)
        shown = self._decode(self.tokens[self._prefix : self._read])
        full = self._decode(self.tokens[self._prefix :])
        if len(full) <= len(shown) or full.endswith("\ufffd"):
            return ""
        delta = full[len(shown) :]
        self._prefix, self._read = self._read, len(self.tokens)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of generation: whatever text is still held back, incomplete characters included."""
        shown = self._decode(self.tokens[self._prefix : self._read])
        full = self._decode(self.tokens[self._prefix :])
        delta = full[len(shown) :] if len(full) > len(shown) else ""
        self._prefix = self._read = len(self.tokens)
        self.text += delta
        return delta
