"""The Python API: ``generate`` and ``stream`` over any method, with text, stop strings and statistics."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from hasten.engine import DecodeStats, decode
from hasten.errors import HastenError
from hasten.methods import build_proposer
from hasten.models import LoadedModel, encode_messages, encode_prompt
from hasten.sampling import SamplingParams
from hasten.text import IncrementalDetokenizer

Prompt = str | Sequence[int] | Sequence[dict[str, str]]


@dataclass
class GenerationResult:
    """One finished generation and how it went."""

    text: str
    token_ids: list[int]
    method: str
    prompt_tokens: int
    finish_reason: str  # "stop" (end of sequence or stop string) or "length"
    target_passes: int
    mean_accepted: float
    tokens_per_s: float
    wall_s: float
    drafted_tokens: int = 0
    accepted_drafts: int = 0
    method_stats: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StreamEvent:
    """A piece of a streamed generation; the last event carries ``result``."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    result: GenerationResult | None = None


def prompt_ids(loaded: LoadedModel, prompt: Prompt, chat: bool = True) -> list[int]:
    """Token ids for text (chat-templated unless ``chat`` is off), chat messages, or ids given as they are."""
    tokenizer = loaded.tokenizer
    if isinstance(prompt, str):
        return encode_prompt(tokenizer, prompt, chat)
    items = list(prompt)
    if not items:
        raise HastenError("the prompt is empty")
    if all(isinstance(item, dict) for item in items):
        return encode_messages(tokenizer, items)
    if all(isinstance(item, int) and not isinstance(item, bool) for item in items):
        bad = next((item for item in items if not 0 <= item < loaded.vocab_size), None)
        if bad is not None:
            raise HastenError(f"token id {bad} is outside the vocabulary (0..{loaded.vocab_size - 1})")
        return items
    raise HastenError("a prompt is a string, a list of token ids or a list of chat messages")


def stream(
    loaded: LoadedModel,
    prompt: Prompt,
    method: str = "auto",
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    chat: bool = True,
    **method_options: Any,
) -> Iterator[StreamEvent]:
    """Generate with speculative decoding, yielding text as soon as it is final; the last event has the result.

    Text that could be the start of a stop string is held back until it is known not to be one, so a
    streamed answer never differs from the non-streamed one.
    """
    params = SamplingParams(temperature, top_k, top_p, seed)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise HastenError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    stops = [s for s in stop if s]
    cut = -1
    ids = prompt_ids(loaded, prompt, chat)
    generator = None if params.greedy else params.generator()
    proposer = build_proposer(method, loaded, params, generator, **method_options)
    target = loaded.backend.new_target(want_hidden=proposer.needs_hidden)
    stats = DecodeStats()
    detok = IncrementalDetokenizer(loaded.tokenizer)
    sent = 0  # characters of text already streamed
    sent_tokens = 0
    finish = "length"
    longest_stop = max((len(s) for s in stops), default=0)
    for chunk in decode(target, proposer, ids, max_new_tokens, params, loaded.eos_token_ids, stats, generator):
        detok.add(chunk)
        if chunk[-1] in loaded.eos_token_ids:
            finish = "stop"
        text = detok.text
        # A stop string can only end inside the newest text: search just the tail.
        tail_from = max(0, sent - longest_stop)
        cut = min((i for i in (text.find(s, tail_from) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            finish = "stop"
            break
        ready = len(text) - max(longest_stop - 1, 0) if finish == "length" else len(text)
        if ready > sent:
            yield StreamEvent(text[sent:ready], detok.tokens[sent_tokens:])
            sent, sent_tokens = ready, len(detok.tokens)
    if cut < 0:
        detok.flush()
    tokens = detok.tokens
    text = detok.text if cut < 0 else detok.text[:cut]
    result = GenerationResult(
        text=text,
        token_ids=tokens,
        method=method,
        prompt_tokens=len(ids),
        finish_reason=finish,
        target_passes=stats.target_passes,
        mean_accepted=stats.mean_accepted,
        tokens_per_s=stats.tokens_per_s,
        wall_s=stats.wall_s,
        drafted_tokens=stats.drafted_tokens,
        accepted_drafts=stats.accepted_drafts,
        method_stats=proposer.stats(),
    )
    yield StreamEvent(text[sent:], tokens[sent_tokens:], result)


def generate(loaded: LoadedModel, prompt: Prompt, method: str = "auto", **kwargs: Any) -> GenerationResult:
    """Generate one answer; see ``stream`` for the arguments."""
    for event in stream(loaded, prompt, method, **kwargs):
        if event.result is not None:
            return event.result
    raise AssertionError("stream ended without a result")


def generate_batch(loaded: LoadedModel, prompts: Sequence[Prompt], method: str = "auto",
                   **kwargs: Any) -> list[GenerationResult]:
    """Generate for several prompts (one after another for now; each keeps its own cache and statistics)."""
    return [generate(loaded, prompt, method, **kwargs) for prompt in prompts]
