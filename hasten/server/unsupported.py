"""OpenAI request fields hasten does not honour: refused by name unless their value asks for nothing.

A request model lists its own in ``UNSUPPORTED`` (field -> why); ``drop_neutral`` removes those whose value is
neutral (``tools: []``, ``echo: false``, ...), and the model's ``extra="forbid"`` refuses the rest, together with
fields nobody knows. ``refusal`` turns those errors into one line that names every such field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Unsupported:
    """Why a field cannot be honoured, and the values that ask for nothing (accepted and ignored)."""

    reason: str
    neutral: tuple[Any, ...] = (None,)

    def asks_nothing(self, value: Any) -> bool:
        return any(_same(value, neutral) for neutral in self.neutral)


def _same(value: Any, neutral: Any) -> bool:
    """Equal and of the same kind (``true`` is not ``1``; ``0`` and ``0.0`` are the same number)."""
    if isinstance(value, bool) or isinstance(neutral, bool):
        return value is neutral
    if isinstance(value, int | float) and isinstance(neutral, int | float):
        return value == neutral
    return type(value) is type(neutral) and value == neutral


TOOLS = "tool and function calls are not implemented"

# Fields of a chat or a text completion request.
REQUEST: dict[str, Unsupported] = {
    "tools": Unsupported(TOOLS, (None, [])),
    "tool_choice": Unsupported(TOOLS, (None, "none")),
    "functions": Unsupported(TOOLS, (None, [])),
    "function_call": Unsupported(TOOLS, (None, "none")),
    "audio": Unsupported("audio output is not implemented"),
    "modalities": Unsupported("only text output is implemented", (None, ["text"])),
    "reasoning_effort": Unsupported("the model does not reason in a separate channel"),
    "verbosity": Unsupported("there is no verbosity control"),
    "web_search_options": Unsupported("there is no web search"),
    "best_of": Unsupported("best-of-n ranking is not implemented; use n", (None, 1)),
    "echo": Unsupported("echoing the prompt is not implemented", (None, False)),
    "suffix": Unsupported("insertion (text after the completion) is not implemented", (None, "")),
}

# Fields of a chat message (a client that sends back the assistant message it got includes them, empty).
MESSAGE: dict[str, Unsupported] = {
    "tool_calls": Unsupported(TOOLS, (None, [])),
    "function_call": Unsupported(TOOLS),
    "audio": Unsupported("audio is not implemented"),
    "refusal": Unsupported("a refusal turn cannot be rendered by the chat template"),
    "annotations": Unsupported("annotations cannot be rendered by the chat template", (None, [])),
}


def drop_neutral(data: Any, unsupported: dict[str, Unsupported]) -> Any:
    """``data`` without the unsupported fields whose value asks for nothing (anything else as it is)."""
    if not isinstance(data, dict):
        return data
    return {key: value for key, value in data.items()
            if not (key in unsupported and unsupported[key].asks_nothing(value))}


def refusal(locations: list[tuple[str | int, ...]]) -> tuple[str, str, str]:
    """One line naming the refused fields (their places in the body); the first one's top-level name (the
    ``param``); and the code: ``unsupported_parameter`` when all are OpenAI fields, else ``unknown_parameter``."""
    parts, unknown = [], False
    for loc in locations:
        name = ".".join(str(part) for part in loc)
        table = REQUEST if len(loc) == 1 else MESSAGE if loc[0] == "messages" and len(loc) == 3 else {}
        known = table.get(str(loc[-1]))
        unknown = unknown or known is None
        parts.append(f"'{name}' ({known.reason if known else 'unknown to this server'})")
    them = "it" if len(parts) == 1 else "them"
    message = f"unsupported field{'s' if len(parts) > 1 else ''} {', '.join(parts)}; remove {them}"
    return message, str(locations[0][0]), "unknown_parameter" if unknown else "unsupported_parameter"
