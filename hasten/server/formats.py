"""OpenAI response objects and streaming chunks for chat and text completions."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from hasten.api import GenerationResult, TokenLogprob
from hasten.server.logprobs import TokenTexts, chat_logprobs, completion_logprobs

KEEPALIVE = ": keep-alive\n\n"  # an SSE comment: clients ignore it, connections and proxies stay open


def sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event line (``data: ...`` and a blank line)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def usage(results: dict[int, GenerationResult], n: int) -> dict[str, int]:
    """Token counts: each prompt counted once (not once per choice), every choice's completion tokens."""
    prompt = sum(result.prompt_tokens for index, result in results.items() if index % n == 0)
    completion = sum(len(result.token_ids) for result in results.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def statistics(results: dict[int, GenerationResult], method: str) -> dict[str, Any]:
    """hasten's own numbers, summed over the choices of a request."""
    tokens = sum(len(r.token_ids) for r in results.values())
    passes = sum(r.target_passes for r in results.values())
    wall = sum(r.wall_s for r in results.values())
    return {
        "method": method,
        "target_passes": passes,
        "mean_accepted": round(tokens / passes, 4) if passes else 0.0,
        "tokens_per_s": round(tokens / wall, 2) if wall > 0 else 0.0,
        "drafted_tokens": sum(r.drafted_tokens for r in results.values()),
        "accepted_drafts": sum(r.accepted_drafts for r in results.values()),
        "wall_s": round(wall, 4),
    }


@dataclass
class Reply:
    """Builds the objects of one request's answer; ``chat`` picks the chat or the text-completion shape.
    With ``texts`` (the tokenizer's token texts), choices carry their tokens' log-probabilities."""

    chat: bool
    model: str
    method: str
    n: int
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    texts: TokenTexts | None = None
    _offsets: dict[int, int] = field(default_factory=dict)  # per streamed text choice: its characters so far

    def __post_init__(self) -> None:
        if not self.id:
            self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]

    def _logprobs(self, index: int, entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
        """A choice's (or a chunk's) ``logprobs`` object; None when none were asked for."""
        if self.texts is None or entries is None:
            return None
        if self.chat:
            return chat_logprobs(entries, self.texts)
        shaped = completion_logprobs(entries, self.texts, self._offsets.get(index, 0))
        self._offsets[index] = self._offsets.get(index, 0) + sum(len(token) for token in shaped["tokens"])
        return shaped

    def _head(self, object: str) -> dict[str, Any]:
        return {"id": self.id, "object": object, "created": self.created, "model": self.model}

    def response(self, results: dict[int, GenerationResult]) -> dict[str, Any]:
        choices = []
        for index in sorted(results):
            result = results[index]
            choice: dict[str, Any] = {"index": index}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": result.text}
            else:
                choice["text"] = result.text
            choice.update(logprobs=self._logprobs(index, result.logprobs), finish_reason=result.finish_reason)
            choices.append(choice)
        head = self._head("chat.completion" if self.chat else "text_completion")
        return {**head, "choices": choices, "usage": usage(results, self.n),
                "hasten": statistics(results, self.method)}

    def chunk(self, index: int, text: str | None = None, finish_reason: str | None = None,
              role: bool = False, logprobs: list[TokenLogprob] | None = None) -> dict[str, Any]:
        """A streamed piece of choice ``index``: text (and its tokens' ``logprobs``), the opening role (chat) or
        the finish reason."""
        choice: dict[str, Any] = {"index": index}
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        choice.update(logprobs=self._logprobs(index, logprobs), finish_reason=finish_reason)
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}

    def usage_chunk(self, results: dict[int, GenerationResult]) -> dict[str, Any]:
        """The last chunk when ``stream_options.include_usage`` is on: no choices, the usage."""
        head = self._head("chat.completion.chunk" if self.chat else "text_completion")
        return {**head, "choices": [], "usage": usage(results, self.n), "hasten": statistics(results, self.method)}
