"""Benchmark prompts: Spec-Bench JSONL (``question_id``, ``category``, ``turns``) or the simple ``prompt`` form,
each with an optional ``response_format`` (the OpenAI object) that constrains its answers."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from hasten.errors import HastenError
from hasten.response_format import ResponseFormat, check_response_format

SHIPPED = "bench_prompts.jsonl"
DEFAULT_CATEGORY = "general"


@dataclass(frozen=True)
class BenchPrompt:
    """One benchmark question: its id, category and user turns (more than one turn = a conversation), and the
    ``response_format`` every answer must follow (None: free text)."""

    question_id: str | int
    category: str
    turns: tuple[str, ...]
    response_format: ResponseFormat | None = field(default=None, hash=False)


def shipped_prompts_path() -> Path:
    """The development prompt set inside the package (``hasten/data/bench_prompts.jsonl``)."""
    return Path(str(resources.files("hasten") / "data" / SHIPPED))


def _parse(record: object, where: str, line_number: int) -> BenchPrompt:
    if not isinstance(record, dict):
        raise HastenError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "turns" in record and "prompt" in record:
        raise HastenError(f"{where}: give either 'turns' (Spec-Bench) or 'prompt', not both")
    if "turns" in record:
        turns = record["turns"]
        if not isinstance(turns, list) or not turns:
            raise HastenError(f"{where}: 'turns' must be a non-empty list of strings")
        if "question_id" not in record:
            raise HastenError(f"{where}: missing 'question_id'")
        question_id = record["question_id"]
    elif "prompt" in record:
        turns = [record["prompt"]]
        question_id = record.get("question_id", record.get("id", line_number))
    else:
        raise HastenError(f"{where}: missing 'turns' (Spec-Bench format) or 'prompt'")
    if not all(isinstance(turn, str) and turn.strip() for turn in turns):
        raise HastenError(f"{where}: every turn must be a non-empty string")
    if isinstance(question_id, bool) or not isinstance(question_id, (str, int)):
        raise HastenError(f"{where}: 'question_id' must be a string or an integer")
    category = record.get("category", DEFAULT_CATEGORY)
    if not isinstance(category, str) or not category.strip():
        raise HastenError(f"{where}: 'category' must be a non-empty string")
    response_format = record.get("response_format")
    if response_format is not None:
        try:
            check_response_format(response_format)
        except HastenError as error:
            raise HastenError(f"{where}: {error}") from None
    return BenchPrompt(question_id, category.strip(), tuple(turns), response_format)


def read_prompts(path: str | Path | None = None) -> list[BenchPrompt]:
    """Read a prompt file (the shipped set when ``path`` is None); blank lines are skipped.

    Any malformed line raises ``HastenError`` naming the file and the line number.
    """
    path = shipped_prompts_path() if path is None else Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise HastenError(f"cannot read prompt file {path}: {error}") from error
    prompts: list[BenchPrompt] = []
    seen: dict[str | int, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise HastenError(f"{where}: not valid JSON ({error.msg})") from error
        prompt = _parse(record, where, number)
        if prompt.question_id in seen:
            raise HastenError(f"{where}: question_id {prompt.question_id!r} already used on line "
                              f"{seen[prompt.question_id]}")
        seen[prompt.question_id] = number
        prompts.append(prompt)
    if not prompts:
        raise HastenError(f"{path} holds no prompts")
    return prompts


def balanced_subset(prompts: list[BenchPrompt], limit: int | None) -> list[BenchPrompt]:
    """At most ``limit`` prompts, taken in turn from each category (so a small limit still covers them all).

    The chosen prompts keep their order in the file.
    """
    if limit is None or limit >= len(prompts):
        return list(prompts)
    if limit < 1:
        raise HastenError(f"--limit must be >= 1, got {limit}")
    queues: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        queues.setdefault(prompt.category, []).append(index)
    chosen: list[int] = []
    depth = 0
    while len(chosen) < limit:
        for queue in queues.values():
            if depth < len(queue) and len(chosen) < limit:
                chosen.append(queue[depth])
        depth += 1
    return [prompts[index] for index in sorted(chosen)]


def select_categories(prompts: list[BenchPrompt], categories: list[str] | None) -> list[BenchPrompt]:
    """The prompts of the given categories (all when None), in file order; an unknown category is an error."""
    if categories is None:
        return list(prompts)
    known = list(dict.fromkeys(p.category for p in prompts))
    unknown = [c for c in categories if c not in known]
    if unknown or not categories:
        raise HastenError(f"--category: no prompts in {', '.join(map(repr, unknown)) or 'an empty list'} "
                          f"(categories: {', '.join(known)})")
    return [p for p in prompts if p.category in categories]


def with_response_format(prompts: list[BenchPrompt], response_format: ResponseFormat | None) -> list[BenchPrompt]:
    """``response_format`` given to every prompt without its own (prompts with their own keep theirs)."""
    if response_format is None:
        return list(prompts)
    check_response_format(response_format)
    return [p if p.response_format is not None else dataclasses.replace(p, response_format=response_format)
            for p in prompts]
