"""Log-probabilities in OpenAI's two shapes: chat's ``{"content": [...]}`` and the legacy completions' columns.

A token's text is its id decoded alone; its ``bytes`` are that text's UTF-8 bytes.
"""

from __future__ import annotations

from typing import Any

from hasten.api import TokenLogprob

FLOOR = -9999.0  # what a -inf log-probability is sent as (JSON has no infinity; vLLM does the same)


class TokenTexts:
    """Each token id decoded alone, cached (one tokenizer call per id the server ever reports)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.tokenizer.decode([token_id])
        return text


def _value(logprob: float) -> float:
    return max(float(logprob), FLOOR)


def _chat_entry(token_id: int, logprob: float, texts: TokenTexts) -> dict[str, Any]:
    text = texts(token_id)
    return {"token": text, "logprob": _value(logprob), "bytes": list(text.encode("utf-8"))}


def chat_logprobs(entries: list[TokenLogprob], texts: TokenTexts) -> dict[str, Any]:
    """A chat choice's (or chunk's) ``logprobs``: one entry per token, its alternatives most likely first."""
    content = [{**_chat_entry(entry.token_id, entry.logprob, texts),
                "top_logprobs": [_chat_entry(token, logprob, texts) for token, logprob in entry.top]}
               for entry in entries]
    return {"content": content, "refusal": None}


def completion_logprobs(entries: list[TokenLogprob], texts: TokenTexts, offset: int = 0) -> dict[str, Any]:
    """A text completion's ``logprobs``: tokens, their log-probabilities, per token the alternatives as
    ``{text: logprob}`` (the chosen token always among them, as OpenAI's), and each token's character offset in
    the answer, the first at ``offset`` (the text already streamed)."""
    tokens, values, tops, offsets = [], [], [], []
    for entry in entries:
        text = texts(entry.token_id)
        top: dict[str, float] = {}
        for token, logprob in [*entry.top, (entry.token_id, entry.logprob)]:
            top.setdefault(texts(token), _value(logprob))
        tokens.append(text)
        values.append(_value(entry.logprob))
        tops.append(top)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}
