"""Summarise a benchmark per method: speed, speedups as medians over questions, drafting, exactness and the
oracle bound, overall and per category.

A speedup never divides the wall times of runs that wrote different tokens: it is taken over the prompts where both
wrote the same tokens, or per new token where the two cannot be expected to agree (``speedup_basis``), and says
how many of the method's prompts it covers (``<key>_covers``).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hasten.adaptive.cost import CostModel
from hasten.bench.anchors import ANCHORS
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


SAME_TOKENS = "same tokens"
PER_TOKEN = "per token"
SPEEDUPS = ("speedup", "speedup_own", "decode_speedup", "decode_speedup_own")


def speedup_basis(run: Run, reference_backend: str, greedy: bool) -> str:
    """How ``run``'s speedups over a backend's ``ar`` are measured.

    ``SAME_TOKENS``: only over the prompts where both runs wrote the same tokens, a ratio of wall times, for
    hasten's greedy methods on the reference's own backend (their output must equal it). ``PER_TOKEN``: over every
    prompt both ran, a ratio of wall time per new token, where the tokens cannot be expected to be equal: samples,
    anchors (other libraries: other kernels and cache types) and a method on another backend.
    """
    if greedy and run.method not in ANCHORS and run.backend == reference_backend:
        return SAME_TOKENS
    return PER_TOKEN


@dataclass(frozen=True)
class Speedup:
    """A median over prompts of per-prompt ratios, and how many of the method's prompts it covers."""

    value: float | None
    covered: int
    prompts: int


def _compared(records: list[RunRecord], baseline: Mapping[QuestionId, RunRecord],
              basis: str) -> list[tuple[RunRecord, RunRecord]]:
    """The (record, reference) pairs a speedup is over: both ran without error, and under ``SAME_TOKENS`` both
    wrote the same tokens."""
    pairs = []
    for r in records:
        ref = baseline.get(r.question_id)
        if r.error is None and ref is not None and ref.error is None and (
                basis == PER_TOKEN or r.token_ids == ref.token_ids):
            pairs.append((r, ref))
    return pairs


def _seconds_per_token(record: RunRecord) -> float | None:
    return record.wall_s / record.new_tokens if record.new_tokens else None


def _speedup(records: list[RunRecord], baseline: Mapping[QuestionId, RunRecord], basis: str) -> Speedup:
    """Median over the compared prompts of wall(baseline) / wall(record), prefill included; per new token under
    ``PER_TOKEN``."""
    ratios = []
    for r, ref in _compared(records, baseline, basis):
        mine, theirs = (r.wall_s, ref.wall_s) if basis == SAME_TOKENS else (_seconds_per_token(r),
                                                                           _seconds_per_token(ref))
        if mine and theirs:
            ratios.append(theirs / mine)
    return Speedup(_median(ratios), len(ratios), len(records))


def _decode_speedup(records: list[RunRecord], baseline: Mapping[QuestionId, RunRecord], basis: str) -> Speedup:
    """Median over the compared prompts of decode ms/token(baseline) / decode ms/token(record): under
    ``SAME_TOKENS`` only where both gave the same tokens, so the ratio of their decode times."""
    ratios = []
    for r, ref in _compared(records, baseline, basis):
        mine, theirs = decode_ms_per_token(r), decode_ms_per_token(ref)
        if mine and theirs is not None:
            ratios.append(theirs / mine)
    return Speedup(_median(ratios), len(ratios), len(records))


def _figures(speedups: dict[str, Speedup]) -> dict[str, Any]:
    """Each speedup's value under its key, and ``<key>_covers``: [prompts covered, the method's prompts]."""
    out: dict[str, Any] = {}
    for key, figure in speedups.items():
        out[key] = figure.value
        out[f"{key}_covers"] = [figure.covered, figure.prompts]
    return out


def decode_summary(records: list[RunRecord], baseline: Mapping[QuestionId, RunRecord],
                   own_baseline: Mapping[QuestionId, RunRecord], bases: tuple[str, str]) -> dict[str, Any]:
    """Decode speed of a method's records, as medians over questions: prefill ms, decode ms per token after each
    turn's first, and the decode speedups over the primary and the own backend's ``ar`` (``bases``: how each is
    measured). All None when a successful record's prefill was not measured: missing, never counted as zero."""
    good = [r for r in records if r.error is None]
    if any(r.prefill_s is None for r in good):
        return {"prefill_ms": None, "decode_ms_per_token": None,
                **_figures({key: Speedup(None, 0, len(records)) for key in SPEEDUPS[2:]})}
    return {"prefill_ms": _median([1000 * (r.prefill_s or 0.0) for r in good]),
            "decode_ms_per_token": _median([ms for r in good if (ms := decode_ms_per_token(r)) is not None]),
            **_figures({"decode_speedup": _decode_speedup(records, baseline, bases[0]),
                        "decode_speedup_own": _decode_speedup(records, own_baseline, bases[1])})}


def summarise(records: list[RunRecord], baseline: Mapping[QuestionId, RunRecord],
              own_baseline: Mapping[QuestionId, RunRecord] | None = None,
              bases: tuple[str, str] = (SAME_TOKENS, SAME_TOKENS)) -> dict[str, Any]:
    """One method's records: tokens/s, mean accepted and drafting time over totals, speedups (prefill included)
    and decode speed (``decode_summary``) as medians, each speedup with the prompts it covers (``bases``: how the
    speedups over the primary and the own ``ar`` are measured, ``speedup_basis``)."""
    good = [r for r in records if r.error is None]
    own = own_baseline if own_baseline is not None else baseline
    tokens = sum(r.new_tokens for r in good)
    wall = sum(r.wall_s for r in good)
    passes = None if any(r.target_passes is None for r in good) else sum(r.target_passes or 0 for r in good)
    draft = None if any(r.draft_s is None for r in good) else sum(r.draft_s or 0.0 for r in good)
    return {
        "tokens_per_s": _ratio(tokens, wall) or 0.0,
        **_figures({"speedup": _speedup(records, baseline, bases[0]),
                    "speedup_own": _speedup(records, own, bases[1])}),
        **decode_summary(records, baseline, own, bases),
        "mean_accepted": _ratio(tokens, passes),
        "draft_ms_per_step": None if draft is None or not passes else 1000 * draft / passes,
        "target_passes": passes,
        "new_tokens": tokens,
        "wall_s": wall,
    }


def against_anchors(records: list[RunRecord], anchors: Mapping[str, list[RunRecord]]) -> dict[str, Speedup]:
    """A method's speedup over each anchor (by label), per new token over the prompts both ran (another library's
    tokens can differ), the anchor it gains least over first: the best of them."""
    figures = {label: _speedup(records, {r.question_id: r for r in anchor}, PER_TOKEN) for label, anchor in
               anchors.items()}
    return dict(sorted(figures.items(), key=lambda item: (item[1].value is None, item[1].value or 0.0)))


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
    bases = (speedup_basis(run, primary, exact_checked), speedup_basis(run, run.backend, exact_checked))
    entry["speedup_basis"], entry["speedup_own_basis"] = bases
    entry |= summarise(records, refs.primary_ar, refs.own_ar, bases)
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
        part = summarise(chosen, refs.primary_ar, refs.own_ar, bases)
        keys = ("mean_accepted", "tokens_per_s", "decode_ms_per_token", *SPEEDUPS, *(f"{k}_covers" for k in SPEEDUPS))
        parts[category] = {key: part[key] for key in keys}
        parts[category]["oracle"] = oracle_bound(oracle, [r.question_id for r in chosen])["oracle"]
    entry["categories"] = parts
    return entry
