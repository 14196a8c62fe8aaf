"""Incremental detokenization: new text per step in time independent of the answer's length so far."""

from __future__ import annotations

from bisect import bisect_left, bisect_right

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
        self._marks = [(0, 0, 0)]  # (_read, len(text), _prefix) after every add that completed text

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
        self._marks.append((self._read, len(self.text), self._prefix))
        return delta

    def flush(self) -> str:
        """At the end of generation: whatever text is still held back, incomplete characters included."""
        shown = self._decode(self.tokens[self._prefix : self._read])
        full = self._decode(self.tokens[self._prefix :])
        delta = full[len(shown) :] if len(full) > len(shown) else ""
        self._prefix = self._read = len(self.tokens)
        self.text += delta
        self._marks.append((self._read, len(self.text), self._prefix))
        return delta

    def tokens_until(self, cut: int, straddling: bool = True) -> int:
        """How many leading tokens make up ``text[:cut]`` (where a stop string starts).

        With ``straddling``, the fewest whose text covers it, so a token straddling the cut counts; without,
        only those whose text lies wholly before it. A token whose bytes complete a character only after the cut
        never counts, and one that completes a character before it always does. Only the tokens after the last
        step that ended before the cut are decoded again, one at a time.
        """
        if cut <= 0:
            return 0
        find = bisect_left if straddling else bisect_right
        read, length, prefix = self._marks[find(self._marks, cut, key=lambda mark: mark[1]) - 1]
        replay = IncrementalDetokenizer(self.tokenizer)
        replay.tokens, replay.text, replay._prefix, replay._read = self.tokens[:read], self.text[:length], prefix, read
        count = read
        for token in self.tokens[read:]:
            replay.add([token])
            clean = replay._read == len(replay.tokens)  # nothing held back: every token so far is in the text
            if straddling and clean and len(replay.text) >= cut:
                return replay._read
            if not straddling:
                if len(replay.text) > cut:
                    break
                if clean:
                    count = replay._read
        return len(self.tokens) if straddling else count
