"""Summarise a benchmark per method: speed, speedups as medians over questions, drafting, exactness and the
oracle bound, overall and per category."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hasten.adaptive.cost import CostModel
from hasten.bench.oracle import CandidateSource, OracleRun, replay
from hasten.bench.records import BASELINE, QuestionId, Run, RunRecord, add_stats, decode_ms_per_token
from hasten.bench.scoring import ByQuestion, share_equal


@dataclass(frozen=True)
class References:
    """The records a method is measured against, by question: the primary backend's ``ar``, its own backend's,
    and transformers' own greedy decoding (None when ``hf_generate`` did not run, or outputs are samples)."""

    primary_ar: ByQuestion
    own_ar: ByQuestion
    own_label: str  # the label of its own backend's ar
    hf_generate: ByQuestion | None = None


def _ratio(numerator: float, denominator: float | None) -> float | None:
    return numerator / denominator if denominator else None


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _speedup(records: list[RunRecord], baseline: Mapping[QuestionId, RunRecord]) -> float | None:
    """Median over questions of wall(baseline) / wall(record)."""
    ratios = []
    for r in records:
        ref = baseline.get(r.question_id)
        if ref is not None and ref.error is None and r.wall_s > 0:
            ratios.append(ref.wall_s / r.wall_s)
    return _median(ratios)


def _decode_speedup(records: list[RunRecord], baseline: Mapping[QuestionId, RunRecord]) -> float | None:
    """Median over questions of decode ms/token(baseline) / decode ms/token(record): the ratio of decode times
    when both gave the same tokens."""
    ratios = []
    for r in records:
        ref = baseline.get(r.question_id)
        mine, theirs = decode_ms_per_token(r), None if ref is None else decode_ms_per_token(ref)
        if mine and theirs is not None:
            ratios.append(theirs / mine)
    return _median(ratios)


def decode_summary(records: list[RunRecord], baseline: Mapping[QuestionId, RunRecord],
                   own_baseline: Mapping[QuestionId, RunRecord]) -> dict[str, float | None]:
    """Decode speed of a method's successful records, as medians over questions: prefill ms, decode ms per token
    after each turn's first, and the decode speedups over the primary and the own backend's ``ar``. All None when
    a record's prefill was not measured: missing, never counted as zero."""
    if any(r.prefill_s is None for r in records):
        return {"prefill_ms": None, "decode_ms_per_token": None, "decode_speedup": None, "decode_speedup_own": None}
    return {"prefill_ms": _median([1000 * (r.prefill_s or 0.0) for r in records]),
            "decode_ms_per_token": _median([ms for r in records if (ms := decode_ms_per_token(r)) is not None]),
            "decode_speedup": _decode_speedup(records, baseline),
            "decode_speedup_own": _decode_speedup(records, own_baseline)}


def summarise(records: list[RunRecord], baseline: Mapping[QuestionId, RunRecord],
              own_baseline: Mapping[QuestionId, RunRecord] | None = None) -> dict[str, Any]:
    """One method's records: tokens/s, mean accepted and drafting time over totals, speedups (prefill included)
    and decode speed (``decode_summary``) as medians."""
    good = [r for r in records if r.error is None]
    own = own_baseline if own_baseline is not None else baseline
    tokens = sum(r.new_tokens for r in good)
    wall = sum(r.wall_s for r in good)
    passes = None if any(r.target_passes is None for r in good) else sum(r.target_passes or 0 for r in good)
    draft = None if any(r.draft_s is None for r in good) else sum(r.draft_s or 0.0 for r in good)
    return {
        "tokens_per_s": _ratio(tokens, wall) or 0.0,
        "speedup": _speedup(good, baseline),
        "speedup_own": _speedup(good, own),
        **decode_summary(good, baseline, own),
        "mean_accepted": _ratio(tokens, passes),
        "draft_ms_per_step": None if draft is None or not passes else 1000 * draft / passes,
        "target_passes": passes,
        "new_tokens": tokens,
        "wall_s": wall,
    }


def method_stats(records: list[RunRecord]) -> dict[str, float]:
    """The proposers' statistics over all records, weighted by target passes."""
    merged = RunRecord(0, "", "")
    passes = 0
    for r in records:
        if r.error is None and r.target_passes:
            add_stats(merged, r.method_stats, r.target_passes, passes)
            passes += r.target_passes
    return merged.method_stats


def oracle_runs(source: CandidateSource, baseline: list[RunRecord], cost: CostModel) -> dict[QuestionId, OracleRun]:
    """Replay ``source``'s oracle along every greedy ``ar`` answer (all turns of each question added up)."""
    runs: dict[QuestionId, OracleRun] = {}
    for r in baseline:
        if r.error is None:
            runs[r.question_id] = sum((replay(p, out, source, cost) for p, out in
                                       zip(r.prompt_ids, r.token_ids, strict=True)), OracleRun())
    return runs


def oracle_bound(runs: Mapping[QuestionId, OracleRun] | None,
                 question_ids: Sequence[QuestionId]) -> dict[str, float | None]:
    """The oracle bound of some questions: the median of their bounds, and tokens per pass over totals (both
    None when the method has no oracle, ``runs`` None)."""
    if runs is None:
        return {"oracle": None, "oracle_mean_accepted": None}
    chosen = [runs[q] for q in question_ids if q in runs]
    total = sum(chosen, OracleRun())
    return {"oracle": _median([s for r in chosen if (s := r.speedup) is not None]),
            "oracle_mean_accepted": total.mean_accepted}


def _drafting(run: Run, records: list[RunRecord], passes: int | None) -> dict[str, Any]:
    """Draft acceptance, the proposer's own statistics, drafted tokens per pass and the share of plain steps."""
    good = [r for r in records if r.error is None]
    drafted = [r.drafted_tokens for r in good]
    entry: dict[str, Any] = {"draft_acceptance": None}
    if drafted and None not in drafted and sum(d or 0 for d in drafted):
        entry["draft_acceptance"] = sum(r.accepted_drafts or 0 for r in good) / sum(d or 0 for d in drafted)
    stats = method_stats(records)
    entry["method_stats"] = stats
    entry["mean_drafted"] = stats.get("mean_drafted")
    if entry["mean_drafted"] is None and None not in drafted and passes:
        entry["mean_drafted"] = sum(d or 0 for d in drafted) / passes
    entry["plain_steps"] = stats.get("plain_steps", 1.0 if run.method == BASELINE else None)
    return entry


def structured(records: list[RunRecord]) -> dict[str, Any] | None:
    """How many of the constrained questions' answers parse and validate, and why the others do not (None when
    no question that ran was constrained)."""
    checked = [r for r in records if r.error is None and r.json_valid is not None]
    if not checked:
        return None
    return {"answers": len(checked), "valid": sum(bool(r.json_valid) for r in checked),
            "invalid": [{"question_id": r.question_id, "error": r.json_error} for r in checked if not r.json_valid]}


def summarise_method(run: Run, records: list[RunRecord], refs: References, *, primary: str, exact_checked: bool,
                     oracle: Mapping[QuestionId, OracleRun] | None, categories: list[str]) -> dict[str, Any]:
    """One method's entry of ``results.json``: overall figures, exactness, drafting, the oracle bound (``oracle``
    None: the method has none) and the same figures per category."""
    entry: dict[str, Any] = {"method": run.method, "backend": run.backend, "baseline": refs.own_label}
    entry |= summarise(records, refs.primary_ar, refs.own_ar)
    mismatches = [r.question_id for r in records if r.exact is False]
    entry["exact"] = (not mismatches) if exact_checked else None
    entry["mismatches"] = mismatches
    entry["errors"] = [{"question_id": r.question_id, "error": r.error} for r in records if r.error]
    if exact_checked and run.backend != primary:
        entry["same_as_primary_ar"] = share_equal(records, refs.primary_ar)
    if exact_checked and refs.hf_generate is not None:
        entry["same_as_hf_generate"] = share_equal(records, refs.hf_generate)
    entry |= _drafting(run, records, entry["target_passes"])
    entry |= oracle_bound(oracle, [r.question_id for r in records])
    entry["structured"] = structured(records)
    parts: dict[str, Any] = {}
    for category in categories:
        chosen = [r for r in records if r.category == category]
        part = summarise(chosen, refs.primary_ar, refs.own_ar)
        parts[category] = {key: part[key] for key in ("speedup", "speedup_own", "mean_accepted", "tokens_per_s",
                                                      "decode_ms_per_token", "decode_speedup", "decode_speedup_own")}
        parts[category]["oracle"] = oracle_bound(oracle, [r.question_id for r in chosen])["oracle"]
    entry["categories"] = parts
    return entry
