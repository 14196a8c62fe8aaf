"""Score a benchmark's outputs against references: each method against its own backend's ``ar`` (exactness),
and against transformers' own greedy decoding (``hf_generate``), which can differ from ``ar`` at near-ties."""

from __future__ import annotations

from collections.abc import Mapping

from hasten.bench.records import BASELINE, QuestionId, Run, RunRecord, label_for

ByQuestion = dict[QuestionId, RunRecord]
HF_REFERENCE = "hf_generate"


def baselines_by_backend(records: Mapping[str, list[RunRecord]], backends: list[str],
                         primary: str) -> dict[str, ByQuestion]:
    """Each backend's ``ar`` records, by question."""
    return {backend: {r.question_id: r for r in records[label_for(BASELINE, backend, primary)]}
            for backend in backends}


def score_exactness(records: Mapping[str, list[RunRecord]], runs: Mapping[str, Run],
                    baselines: Mapping[str, ByQuestion]) -> None:
    """Set ``exact`` on every record that ran, and whose own backend's ``ar`` ran: its tokens equal that ``ar``'s,
    turn for turn (only meaningful under greedy decoding)."""
    for label, method_records in records.items():
        own = baselines[runs[label].backend]
        for r in method_records:
            ref = own[r.question_id]
            if r.error is None and ref.error is None:
                r.exact = r.token_ids == ref.token_ids


def share_equal(records: list[RunRecord], reference: Mapping[QuestionId, RunRecord]) -> float | None:
    """The share of questions on which ``records`` gave the same tokens as ``reference`` (both without error);
    None when no question can be compared."""
    same = [r.token_ids == reference[r.question_id].token_ids for r in records
            if r.error is None and r.question_id in reference and reference[r.question_id].error is None]
    return sum(same) / len(same) if same else None


def hf_reference(records: Mapping[str, list[RunRecord]]) -> ByQuestion | None:
    """transformers' own greedy records by question, None when that anchor did not run."""
    if HF_REFERENCE not in records:
        return None
    return {r.question_id: r for r in records[HF_REFERENCE]}
