"""The Python API: ``generate`` and ``stream`` over any method, with text, stop strings and statistics."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from hasten.batching import BatchDecoder
from hasten.engine import DecodeStats, Generation, run
from hasten.errors import HastenError
from hasten.grammar import Grammar, compile_constraint
from hasten.logprobs import MAX_TOP_LOGPROBS, TokenLogprob
from hasten.methods import build_proposer
from hasten.models import LoadedModel, encode_messages, encode_prompt
from hasten.penalties import Penalties, PenaltyState
from hasten.proposers.base import Proposer
from hasten.sampling import SamplingParams
from hasten.shaping import Shaper
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
    draft_ms_per_step: float = 0.0  # time in the proposer per target pass
    draft_s: float = 0.0  # time in the proposer in all (its draft model's passes included)
    prefill_s: float = 0.0  # time of the prompt's pass
    method_stats: dict[str, float] = field(default_factory=dict)
    logprobs: list[TokenLogprob] | None = None  # one per token id, when asked for

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StreamEvent:
    """A piece of a streamed generation; the last event carries ``result``. ``logprobs`` (when asked for)
    has one entry per token id of the event."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    result: GenerationResult | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


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


@dataclass
class Request:
    """One generation asked for: everything ``stream`` takes, checked and tokenized."""

    ids: list[int]
    method: str
    params: SamplingParams
    max_new_tokens: int
    stops: list[str]
    options: dict[str, Any]
    penalties: Penalties = field(default_factory=Penalties)
    constraint: Grammar | None = None
    logprobs: int | None = None  # alternatives per token (0: the chosen token's only); None: no logprobs
    expected: list[int] = field(default_factory=list)  # the predicted output's tokens: drafts only


def _top_logprobs(logprobs: bool, top_logprobs: int) -> int | None:
    if not isinstance(logprobs, bool):
        raise HastenError(f"logprobs must be true or false, got {logprobs!r}")
    if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) or \
            not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise HastenError(f"top_logprobs must be an integer in 0..{MAX_TOP_LOGPROBS}, got {top_logprobs!r}")
    if top_logprobs and not logprobs:
        raise HastenError("top_logprobs needs logprobs")
    return top_logprobs if logprobs else None


def make_request(loaded: LoadedModel, prompt: Prompt, method: str = "auto", *, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 min_p: float = 0.0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                 repetition_penalty: float = 1.0, logit_bias: Mapping[int, float] | None = None,
                 response_format: Mapping[str, Any] | None = None, regex: str | None = None,
                 grammar: str | None = None, logprobs: bool = False, top_logprobs: int = 0,
                 stop: Sequence[str] = (), chat: bool = True, prediction: str | None = None,
                 **method_options: Any) -> Request:
    """Validate and tokenize one request (every error is a ``HastenError``, raised before any work).

    ``prediction`` is text the answer is expected to resemble (OpenAI's predicted output, such as the code being
    edited): prompt lookup, lookahead and auto draft from it as well; it never changes what is generated.
    """
    params = SamplingParams(temperature, top_k, top_p, seed, min_p)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise HastenError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    penalties = Penalties(presence_penalty, frequency_penalty, repetition_penalty, dict(logit_bias or {}))
    penalties.check_vocabulary(loaded.vocab_size)
    constraint = compile_constraint(loaded.tokenizer, loaded.vocab_size, response_format, regex, grammar)
    if prediction is not None and not isinstance(prediction, str):
        raise HastenError(f"prediction must be a string, got {type(prediction).__name__}")
    expected = loaded.tokenizer.encode(prediction, add_special_tokens=False) if prediction else []
    if len(expected) > loaded.max_context:
        raise HastenError(f"the prediction has {len(expected)} tokens; the model's context is {loaded.max_context}")
    return Request(prompt_ids(loaded, prompt, chat), method, params, max_new_tokens, [s for s in stop if s],
                   method_options, penalties, constraint, _top_logprobs(logprobs, top_logprobs), expected)


def start_generation(loaded: LoadedModel, request: Request) -> Generation:
    """The engine's state for a request: its proposer, its own target sequence, its generator, its shaper."""
    params = request.params
    generator = None if params.greedy else params.generator(getattr(loaded.backend, "device", "cpu"))
    proposer = build_proposer(request.method, loaded, params, generator, **request.options)
    if request.expected:
        proposer.expect(request.expected)
    target = loaded.backend.new_target(want_hidden=proposer.needs_hidden)
    penalties = PenaltyState(request.penalties, request.ids, loaded.vocab_size) if request.penalties.active else None
    grammar = request.constraint.matcher() if request.constraint is not None else None
    jump_forward = type(proposer) is not Proposer  # ``ar`` stays plain decoding: one token a pass
    shaper = Shaper(penalties, grammar, jump_forward) if penalties is not None or grammar is not None else None
    return Generation(target, proposer, request.ids, request.max_new_tokens, params, loaded.eos_token_ids,
                      DecodeStats(), generator, shaper, request.logprobs)


class TextOutput:
    """Turns a generation's token chunks into final text: stop strings, held-back text and the result.

    Text that could be the start of a stop string is held back until it is known not to be one, and its token
    ids and logprobs with it, so a streamed answer (text, ids and logprobs) never differs from the non-streamed one.
    """

    def __init__(self, loaded: LoadedModel, request: Request, generation: Generation | None = None) -> None:
        self.loaded, self.request, self.generation = loaded, request, generation
        self.detok = IncrementalDetokenizer(loaded.tokenizer)
        self.longest_stop = max((len(s) for s in request.stops), default=0)
        self.sent = 0  # characters of text already handed out
        self.sent_tokens = 0
        self.cut = -1
        self.finish = "length"

    def add(self, chunk: list[int]) -> StreamEvent | None:
        """Take one step's tokens; the text now final (None if none). ``stopped`` tells if a stop string hit."""
        self.detok.add(chunk)
        if chunk and chunk[-1] in self.loaded.eos_token_ids:
            self.finish = "stop"
        text = self.detok.text
        # A stop string can only end inside the newest text: search just the tail.
        tail_from = max(0, self.sent - self.longest_stop)
        found = (text.find(s, tail_from) for s in self.request.stops)
        self.cut = min((i for i in found if i >= 0), default=-1)
        if self.cut >= 0:
            self.finish = "stop"
            return None
        ready = len(text) - max(self.longest_stop - 1, 0) if self.finish == "length" else len(text)
        if ready <= self.sent:
            return None
        # Token ids (and logprobs) go out with their text: only those whose text lies wholly in what is sent, so a
        # stop string found later, which starts at ``ready`` or after, never cuts ids already streamed.
        tokens = self.detok.tokens_until(ready, straddling=False) if self.longest_stop else len(self.detok.tokens)
        tokens = max(tokens, self.sent_tokens)
        event = StreamEvent(text[self.sent : ready], self.detok.tokens[self.sent_tokens : tokens],
                            logprobs=self._logprobs(self.sent_tokens, tokens))
        self.sent, self.sent_tokens = ready, tokens
        return event

    def _logprobs(self, start: int, end: int) -> list[TokenLogprob]:
        """The generation's logprobs of tokens ``start:end`` (empty when none were asked for)."""
        return self.generation.logprobs[start:end] if self.generation is not None else []

    @property
    def stopped(self) -> bool:
        return self.cut >= 0

    def close(self, generation: Generation) -> StreamEvent:
        """The last event, carrying the result."""
        if self.cut < 0:
            self.detok.flush()
            text, tokens = self.detok.text, self.detok.tokens
        else:
            text = self.detok.text[: self.cut]
            tokens = self.detok.tokens[: self.detok.tokens_until(self.cut)]
        stats = generation.stats
        result = GenerationResult(
            text=text,
            token_ids=tokens,
            method=self.request.method,
            prompt_tokens=len(self.request.ids),
            finish_reason=self.finish,
            target_passes=stats.target_passes,
            mean_accepted=stats.mean_accepted,
            tokens_per_s=stats.tokens_per_s,
            wall_s=stats.wall_s,
            drafted_tokens=stats.drafted_tokens,
            accepted_drafts=stats.accepted_drafts,
            draft_ms_per_step=stats.draft_ms_per_step,
            draft_s=stats.draft_s,
            prefill_s=stats.prefill_s,
            method_stats=generation.proposer.stats(),
            logprobs=generation.logprobs[: len(tokens)] if generation.want_logprobs is not None else None,
        )
        return StreamEvent(text[self.sent :], tokens[self.sent_tokens :], result,
                           generation.logprobs[self.sent_tokens : len(tokens)])


def stream(loaded: LoadedModel, prompt: Prompt, method: str = "auto", **kwargs: Any) -> Iterator[StreamEvent]:
    """Generate with speculative decoding, yielding text as soon as it is final; the last event has the result.

    Keyword arguments: ``max_new_tokens`` (128), ``temperature`` (0 = greedy), ``top_k``, ``top_p``, ``min_p``,
    ``seed``, ``presence_penalty``, ``frequency_penalty``, ``repetition_penalty``, ``logit_bias`` (token id ->
    bias), ``response_format`` (OpenAI's), ``regex`` or ``grammar`` (Lark), ``logprobs`` and ``top_logprobs``,
    ``stop`` (strings), ``chat`` (apply the chat template to a string prompt), ``prediction`` (text the answer
    is expected to resemble: drafts only), and the method's own options.
    """
    request = make_request(loaded, prompt, method, **kwargs)
    generation = start_generation(loaded, request)
    output = TextOutput(loaded, request, generation)
    first = generation.prefill()
    for chunk in run(generation, first):
        event = output.add(chunk)
        if output.stopped:
            break
        if event is not None:
            yield event
    yield output.close(generation)


def generate(loaded: LoadedModel, prompt: Prompt, method: str = "auto", **kwargs: Any) -> GenerationResult:
    """Generate one answer; see ``stream`` for the arguments."""
    for event in stream(loaded, prompt, method, **kwargs):
        if event.result is not None:
            return event.result
    raise AssertionError("stream ended without a result")


def generate_batch(loaded: LoadedModel, prompts: Sequence[Prompt], method: str = "auto",
                   **kwargs: Any) -> list[GenerationResult]:
    """Generate for several prompts decoded together: one target pass per step scores every active sequence.

    Each sequence keeps its own proposer, cache and statistics; greedy outputs equal one-at-a-time outputs.
    """
    requests = [make_request(loaded, prompt, method, **kwargs) for prompt in prompts]
    batch = BatchDecoder(getattr(loaded.backend, "score_many", None))
    outputs: dict[int, tuple[Generation, TextOutput]] = {}
    for request in requests:
        generation = start_generation(loaded, request)
        output = TextOutput(loaded, request, generation)
        outputs[id(generation)] = (generation, output)
        output.add(batch.add(generation))
        if output.stopped:
            batch.remove(generation)
    while batch.active:
        for generation, chunk in batch.step():
            output = outputs[id(generation)][1]
            output.add(chunk)
            if output.stopped:
                batch.remove(generation)
    return [output.close(generation).result for generation, output in outputs.values()]
