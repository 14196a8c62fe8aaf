"""Request bodies of the OpenAI endpoints, validated strictly (a wrong type is an error, not a coercion)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hasten.server.unsupported import MESSAGE, REQUEST, Unsupported, drop_neutral

MAX_N = 16  # choices per request: bounds the work one request can queue
MAX_STOP = 4  # stop strings, as OpenAI allows
MAX_SEED = 2**63 - 1

PositiveInt = Annotated[int, Field(ge=1)]


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


class Message(_Strict):
    UNSUPPORTED = MESSAGE

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart]
    name: str | None = None

    def as_template_input(self) -> dict[str, str]:
        """The ``{"role", "content"}`` dict a chat template reads (text parts joined)."""
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": self.role, "content": text}


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # accepted; no obfuscation field is sent


class Prediction(_Strict):
    """A predicted output: it only speeds generation up at OpenAI, never changes it; accepted and ignored."""

    type: Literal["content"]
    content: str | list[ContentPart]


class GenerationRequest(_Strict):
    """Fields shared by chat and text completions, plus hasten's ``method`` and ``top_k``."""

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
    # Accepted and ignored: they cannot change the generated text.
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None  # without tools (refused) it means nothing
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    safety_identifier: str | None = None
    prediction: Prediction | None = None

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
        }


class ChatRequest(GenerationRequest):
    messages: Annotated[list[Message], Field(min_length=1)]


class CompletionRequest(GenerationRequest):
    # A text, a list of texts (one completion each), or a list of token ids.
    prompt: str | Annotated[list[str], Field(min_length=1)] | Annotated[list[Annotated[int, Field(ge=0)]],
                                                                         Field(min_length=1)]
