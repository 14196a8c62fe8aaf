"""What a benchmark run produces: the rows it runs and one record per method and question."""

from __future__ import annotations

from dataclasses import dataclass, field

from hasten.bench.anchors import ANCHORS

BASELINE = "ar"

QuestionId = str | int


@dataclass(frozen=True)
class Run:
    """One row of the benchmark: a method (or anchor) on a backend, under its label."""

    label: str
    method: str
    backend: str


@dataclass
class RunRecord:
    """One method on one question (all its turns): what came out and how long it took."""

    question_id: QuestionId
    category: str
    method: str  # the label, e.g. "pld" or "pld@transformers"
    backend: str = ""
    wall_s: float = 0.0
    new_tokens: int = 0
    target_passes: int | None = 0
    drafted_tokens: int | None = 0
    accepted_drafts: int | None = 0
    draft_s: float | None = 0.0  # time in the proposer (DecodeStats.draft_s), None for anchors
    prefill_s: float | None = 0.0  # the target's passes over each turn's prompt (None: not measured)
    method_stats: dict[str, float] = field(default_factory=dict)  # the proposer's, weighted by passes over turns
    token_ids: list[list[int]] = field(default_factory=list)  # one list per turn
    prompt_ids: list[list[int]] = field(default_factory=list)  # one list per turn (kept in results for ar only)
    exact: bool | None = None
    error: str | None = None
    json_valid: bool | None = None  # every answer parses and validates (None: the question is not constrained)
    json_error: str | None = None  # why the first answer that does not (its turn, when there are several)
    others_cpu_s: float | None = 0.0  # CPU seconds other processes (and steal) took while it was timed


def label_for(method: str, backend: str, primary: str) -> str:
    """``method`` on the primary backend, ``method@backend`` elsewhere; anchors keep their own name."""
    return method if backend == primary or method in ANCHORS else f"{method}@{backend}"


def add_stats(record: RunRecord, stats: dict[str, float], passes: int, passes_before: int) -> None:
    """Fold one turn's proposer statistics into the record's, weighted by target passes."""
    total = passes_before + passes
    if not total:
        return
    merged = dict(record.method_stats)
    for key, new in stats.items():
        old = merged.get(key)  # a key only some turns have: keep what there is
        merged[key] = new if old is None else (old * passes_before + new * passes) / total
    record.method_stats = merged


def decode_tokens(record: RunRecord) -> int:
    """New tokens after each turn's first (the first comes from the prefill)."""
    return sum(max(len(turn) - 1, 0) for turn in record.token_ids)


def decode_s(record: RunRecord) -> float | None:
    """Wall time less the prefill (None when the prefill was not measured or the run failed)."""
    if record.error is not None or record.prefill_s is None:
        return None
    return record.wall_s - record.prefill_s


def decode_ms_per_token(record: RunRecord) -> float | None:
    """Milliseconds per new token after each turn's first: (wall - prefill) / (new tokens - turns); None when the
    prefill was not measured, the run failed or no turn produced a second token."""
    seconds, tokens = decode_s(record), decode_tokens(record)
    return None if seconds is None or not tokens else 1000 * seconds / tokens


def decode_fields(record: RunRecord) -> dict[str, float | int | None]:
    """The decode figures a record's ``results.json`` entry carries beside its measurements."""
    return {"decode_tokens": decode_tokens(record), "decode_s": decode_s(record),
            "decode_ms_per_token": decode_ms_per_token(record)}
