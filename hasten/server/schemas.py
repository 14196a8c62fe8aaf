"""Request bodies of the OpenAI endpoints, validated strictly (a wrong type is an error, not a coercion)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hasten.server.unsupported import MESSAGE, REQUEST, Unsupported, drop_neutral

MAX_N = 16  # choices per request: bounds the work one request can queue
MAX_STOP = 4  # stop strings, as OpenAI allows
MAX_SEED = 2**63 - 1
MAX_CHAT_TOP_LOGPROBS = 20  # OpenAI's bounds on alternatives per token: chat completions
MAX_TEXT_LOGPROBS = 5  # and the legacy text completions

PositiveInt = Annotated[int, Field(ge=1)]
Penalty = Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)]
Bias = Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]


class _Strict(BaseModel):
    """No coercion and no unknown field; an ``UNSUPPORTED`` field is dropped when its value asks for nothing,
    and refused (as unknown) otherwise."""

    model_config = ConfigDict(strict=True, extra="forbid")
    UNSUPPORTED: ClassVar[dict[str, Unsupported]] = {}

    @model_validator(mode="before")
    @classmethod
    def _drop_neutral(cls, data: Any) -> Any:
        return drop_neutral(data, cls.UNSUPPORTED)


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


def _joined(content: str | list[ContentPart]) -> str:
    """A content field's text: the string, or its text parts joined."""
    return content if isinstance(content, str) else "".join(part.text for part in content)


class Message(_Strict):
    UNSUPPORTED = MESSAGE

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart]
    name: str | None = None

    def as_template_input(self) -> dict[str, str]:
        """The ``{"role", "content"}`` dict a chat template reads (text parts joined)."""
        return {"role": self.role, "content": _joined(self.content)}


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # accepted; no obfuscation field is sent


class Prediction(_Strict):
    """A predicted output: text the answer is expected to resemble; drafts come from it, never output."""

    type: Literal["content"]
    content: str | list[ContentPart]

    def text(self) -> str:
        return _joined(self.content)


class JsonSchema(_Strict):
    name: str
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Strict):
    """OpenAI's ``response_format``: plain text, any JSON object, or JSON following a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError('"json_schema" is given with type "json_schema", and only then')
        return self


class GenerationRequest(_Strict):
    """Fields shared by chat and text completions, plus hasten's ``method``, ``top_k``, ``min_p``,
    ``repetition_penalty``, ``regex`` and ``grammar`` (Lark, as llguidance reads it)."""

    UNSUPPORTED = REQUEST

    model: str | None = None
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    temperature: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    method: str | None = None
    min_p: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    logit_bias: dict[str, Bias] | None = None  # token id (a decimal string, as JSON keys are) -> bias
    response_format: ResponseFormat | None = None
    regex: str | None = None
    grammar: str | None = None
    prediction: Prediction | None = None  # drafts only: it speeds generation up, never changes it
    # Accepted and ignored: they cannot change the generated text.
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None  # without tools (refused) it means nothing
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    safety_identifier: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        bad = next((key for key in bias or {} if not (key.isascii() and key.isdigit())), None)
        if bad is not None:
            raise ValueError(f"keys must be token ids (decimal integers >= 0), got {bad!r}")
        return bias

    def logprob_options(self) -> tuple[bool, int]:
        """``(logprobs, top_logprobs)`` as ``hasten.stream`` takes them."""
        return False, 0

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def token_limit(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self, default_max_tokens: int) -> dict[str, Any]:
        """Keyword arguments for ``hasten.stream`` (OpenAI defaults: temperature 1, top_p 1)."""
        return {
            "max_new_tokens": self.token_limit(default_max_tokens),
            "temperature": 1.0 if self.temperature is None else float(self.temperature),
            "top_p": 1.0 if self.top_p is None else float(self.top_p),
            "top_k": self.top_k or 0,
            "stop": self.stop_strings(),
            "prediction": self.prediction.text() if self.prediction is not None else None,
            **self.shaping(),
        }

    def shaping(self) -> dict[str, Any]:
        """Keyword arguments for ``hasten.stream`` that reshape or constrain the distribution, and logprobs."""
        logprobs, top_logprobs = self.logprob_options()
        response_format = self.response_format.model_dump(by_alias=True, exclude_none=True) \
            if self.response_format is not None else None
        return {
            "min_p": float(self.min_p or 0.0),
            "presence_penalty": float(self.presence_penalty or 0.0),
            "frequency_penalty": float(self.frequency_penalty or 0.0),
            "repetition_penalty": 1.0 if self.repetition_penalty is None else float(self.repetition_penalty),
            "logit_bias": {int(token): float(bias) for token, bias in (self.logit_bias or {}).items()} or None,
            "response_format": response_format,
            "regex": self.regex,
            "grammar": self.grammar,
            "logprobs": logprobs,
            "top_logprobs": top_logprobs,
        }


class ChatRequest(GenerationRequest):
    messages: Annotated[list[Message], Field(min_length=1)]
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_CHAT_TOP_LOGPROBS)] | None = None  # needs logprobs

    def logprob_options(self) -> tuple[bool, int]:
        return bool(self.logprobs), self.top_logprobs or 0


class CompletionRequest(GenerationRequest):
    # A text, a list of texts (one completion each), or a list of token ids.
    prompt: str | Annotated[list[str], Field(min_length=1)] | Annotated[list[Annotated[int, Field(ge=0)]],
                                                                         Field(min_length=1)]
    # The legacy field: the number of alternatives per token (0: the chosen token's log-probability only).
    logprobs: Annotated[int, Field(ge=0, le=MAX_TEXT_LOGPROBS)] | None = None

    def logprob_options(self) -> tuple[bool, int]:
        return self.logprobs is not None, self.logprobs or 0
