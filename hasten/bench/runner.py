"""Run every method on every prompt and backend in one process, interleaved, and summarise speed and exactness.

The model may be loaded on several backends (the first is the primary). Every method runs on each: ``pld`` on
the primary backend, ``pld@transformers`` on another. A method's exactness is checked against ``ar`` on its own
backend; ``speedup`` is against the primary backend's ``ar`` and ``speedup_own`` against its own backend's.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from hasten.adaptive import adaptive_state
from hasten.adaptive.cost import CostModel
from hasten.api import generate, prompt_ids
from hasten.bench.anchors import (
    ANCHORS,
    LLAMACPP_ANCHORS,
    LlamaCppAnchor,
    anchor_available,
    anchor_backend,
    run_hf_anchor,
)
from hasten.bench.oracle import CandidateSource, OracleRun, replay, source_for
from hasten.bench.prompts import BenchPrompt
from hasten.errors import HastenError
from hasten.methods import METHODS, build_proposer, options_for
from hasten.models import LoadedModel
from hasten.sampling import SamplingParams

BASELINE = "ar"


@dataclass(frozen=True)
class Run:
    """One row of the benchmark: a method (or anchor) on a backend, under its label."""

    label: str
    method: str
    backend: str


@dataclass
class RunRecord:
    """One method on one question (all its turns): what came out and how long it took."""

    question_id: str | int
    category: str
    method: str  # the label, e.g. "pld" or "pld@transformers"
    backend: str = ""
    wall_s: float = 0.0
    new_tokens: int = 0
    target_passes: int | None = 0
    drafted_tokens: int | None = 0
    accepted_drafts: int | None = 0
    draft_s: float | None = 0.0  # time in the proposer (DecodeStats.draft_s), None for anchors
    prefill_s: float | None = 0.0
    method_stats: dict[str, float] = field(default_factory=dict)  # the proposer's, weighted by passes over turns
    token_ids: list[list[int]] = field(default_factory=list)  # one list per turn
    prompt_ids: list[list[int]] = field(default_factory=list)  # one list per turn (kept in results for ar only)
    exact: bool | None = None
    error: str | None = None


def label_for(method: str, backend: str, primary: str) -> str:
    """``method`` on the primary backend, ``method@backend`` elsewhere; anchors keep their own name."""
    return method if backend == primary or method in ANCHORS else f"{method}@{backend}"


def default_methods() -> list[str]:
    """Every registered method and every anchor (those that cannot run are skipped later)."""
    return [*METHODS, *ANCHORS]


def _as_models(loaded: LoadedModel | Mapping[str, LoadedModel]) -> dict[str, LoadedModel]:
    if isinstance(loaded, LoadedModel):
        return {loaded.backend.backend: loaded}
    models = dict(loaded)
    if not models:
        raise HastenError("no model to benchmark")
    for name, model in models.items():
        if model.backend.backend != name:
            raise HastenError(f"the model given for backend {name!r} runs on {model.backend.backend}")
    return models


def resolve_methods(requested: list[str] | None, models: Mapping[str, LoadedModel], params: SamplingParams,
                    options: dict[str, Any], draft: LoadedModel | None) -> tuple[list[Run], dict[str, str]]:
    """The runs (each backend's ``ar`` first, backends in order) and the skipped labels with a reason.

    A method name runs on every backend; ``name@backend`` on that one only; an anchor on its library's backend.
    """
    names = list(dict.fromkeys(requested if requested is not None else default_methods()))
    if not names:
        raise HastenError("no methods to benchmark")
    primary = next(iter(models))
    wanted: list[Run] = []
    skipped: dict[str, str] = {}
    for name in names:
        method, _, only = name.partition("@")
        if method in ANCHORS:
            backend = anchor_backend(method)
            reason = anchor_available(method, models.get(backend), draft)
            if only and only != backend:
                reason = f"{method} runs on the {backend} backend only"
            if reason is None:
                wanted.append(Run(method, method, backend))
            else:
                skipped[name] = reason
            continue
        if method not in METHODS:
            skipped[name] = f"{method!r} is not a registered method (known: {', '.join([*METHODS, *ANCHORS])})"
            continue
        if only and only not in models:
            skipped[name] = f"backend {only!r} is not loaded (loaded: {', '.join(models)})"
            continue
        for backend in [only] if only else models:
            label = label_for(method, backend, primary)
            try:
                build_proposer(method, models[backend], params, None, **options_for(method, options))
            except HastenError as error:
                skipped[label] = str(error)
                continue
            wanted.append(Run(label, method, backend))
    runs: list[Run] = []
    for backend in models:
        runs.append(Run(label_for(BASELINE, backend, primary), BASELINE, backend))
        runs += [run for run in dict.fromkeys(wanted) if run.backend == backend and run.method != BASELINE]
    return runs, skipped


def conversation_ids(loaded: LoadedModel, messages: list[dict[str, str]]) -> list[int]:
    """Prompt ids of a conversation: the chat template, or the turns joined by blank lines if there is none."""
    if getattr(loaded.tokenizer, "chat_template", None):
        return prompt_ids(loaded, messages)
    return prompt_ids(loaded, "\n\n".join(message["content"] for message in messages), chat=False)


def _add_stats(record: RunRecord, stats: dict[str, float], passes: int, passes_before: int) -> None:
    """Fold one turn's proposer statistics into the record's, weighted by target passes."""
    total = passes_before + passes
    if not total:
        return
    merged = dict(record.method_stats)
    for key, new in stats.items():
        old = merged.get(key)  # a key only some turns have: keep what there is
        merged[key] = new if old is None else (old * passes_before + new * passes) / total
    record.method_stats = merged


def run_question(method: str, loaded: LoadedModel, prompt: BenchPrompt, max_new_tokens: int,
                 params: SamplingParams, options: dict[str, Any], draft: LoadedModel | None, *,
                 label: str | None = None, llamacpp: LlamaCppAnchor | None = None) -> RunRecord:
    """All turns of one question with one method; each later turn sees the method's own earlier answers.

    Only the generation call is timed (``perf_counter`` around it, prefill included), the same for every method.
    """
    record = RunRecord(prompt.question_id, prompt.category, label or method, loaded.backend.backend)
    anchor = method in ANCHORS
    passes_total = drafted = accepted = 0
    draft_total = prefill_total = 0.0
    messages: list[dict[str, str]] = []
    for turn_index, turn in enumerate(prompt.turns):
        messages.append({"role": "user", "content": turn})
        ids = conversation_ids(loaded, messages)
        seed = None if params.seed is None else params.seed + turn_index
        turn_params = SamplingParams(params.temperature, params.top_k, params.top_p, seed)
        if anchor:
            began = time.perf_counter()
            if method in LLAMACPP_ANCHORS:
                if llamacpp is None:
                    raise HastenError(f"{method} needs its llama_cpp.Llama")
                out = llamacpp.run(ids, max_new_tokens, turn_params)
            else:
                out = run_hf_anchor(method, loaded, ids, max_new_tokens, turn_params, draft)
            record.wall_s += time.perf_counter() - began
            tokens, passes = out.token_ids, out.target_passes
        else:
            forget_prompts = getattr(loaded.backend, "forget_prompts", None)
            if forget_prompts is not None:  # every run prefills its whole prompt, as the llama.cpp anchors do
                forget_prompts()
            began = time.perf_counter()
            result = generate(loaded, ids, method, max_new_tokens=max_new_tokens, temperature=params.temperature,
                              top_k=params.top_k, top_p=params.top_p, seed=seed, **options_for(method, options))
            record.wall_s += time.perf_counter() - began
            tokens, passes = result.token_ids, result.target_passes
            draft_total += result.draft_s
            prefill_total += result.prefill_s
            drafted += result.drafted_tokens
            accepted += result.accepted_drafts
            _add_stats(record, result.method_stats, passes, passes_total)
        record.prompt_ids.append(ids)
        record.token_ids.append(tokens)
        record.new_tokens += len(tokens)
        passes_total += passes
        answer = str(loaded.tokenizer.decode(tokens, skip_special_tokens=True))
        messages.append({"role": "assistant", "content": answer})
    record.target_passes = passes_total
    if anchor:
        record.drafted_tokens = record.accepted_drafts = record.draft_s = record.prefill_s = None
    else:
        record.drafted_tokens, record.accepted_drafts = drafted, accepted
        record.draft_s, record.prefill_s = draft_total, prefill_total
    return record


def rotated(methods: list[str], shift: int) -> list[str]:
    """The methods in a rotating order, so no method always runs first (or right after another)."""
    shift %= len(methods)
    return methods[shift:] + methods[:shift]


def _ratio(numerator: float, denominator: float | None) -> float | None:
    return numerator / denominator if denominator else None


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _speedup(records: list[RunRecord], baseline: Mapping[str | int, RunRecord]) -> float | None:
    """Median over questions of wall(baseline) / wall(record)."""
    ratios = []
    for r in records:
        ref = baseline.get(r.question_id)
        if ref is not None and ref.error is None and r.wall_s > 0:
            ratios.append(ref.wall_s / r.wall_s)
    return _median(ratios)


def summarise(records: list[RunRecord], baseline: Mapping[str | int, RunRecord],
              own_baseline: Mapping[str | int, RunRecord] | None = None) -> dict[str, Any]:
    """One method's records: tokens/s, mean accepted and drafting time over totals, speedups as medians."""
    good = [r for r in records if r.error is None]
    tokens = sum(r.new_tokens for r in good)
    wall = sum(r.wall_s for r in good)
    passes = None if any(r.target_passes is None for r in good) else sum(r.target_passes or 0 for r in good)
    draft = None if any(r.draft_s is None for r in good) else sum(r.draft_s or 0.0 for r in good)
    return {
        "tokens_per_s": _ratio(tokens, wall) or 0.0,
        "speedup": _speedup(good, baseline),
        "speedup_own": _speedup(good, own_baseline if own_baseline is not None else baseline),
        "mean_accepted": _ratio(tokens, passes),
        "draft_ms_per_step": None if draft is None or not passes else 1000 * draft / passes,
        "target_passes": passes,
        "new_tokens": tokens,
        "wall_s": wall,
    }


def _method_stats(records: list[RunRecord]) -> dict[str, float]:
    """The proposers' statistics over all records, weighted by target passes."""
    merged = RunRecord(0, "", "")
    passes = 0
    for r in records:
        if r.error is None and r.target_passes:
            _add_stats(merged, r.method_stats, r.target_passes, passes)
            passes += r.target_passes
    return merged.method_stats


def _oracle(runs: Mapping[str | int, OracleRun], question_ids: Sequence[str | int]) -> dict[str, float | None]:
    """The oracle bound of some questions: the median of their bounds, and tokens per pass over totals."""
    chosen = [runs[q] for q in question_ids if q in runs]
    total = sum(chosen, OracleRun())
    return {"oracle": _median([s for r in chosen if (s := r.speedup) is not None]),
            "oracle_mean_accepted": total.mean_accepted}


def oracle_runs(source: CandidateSource, baseline: list[RunRecord], cost: CostModel) -> dict[str | int, OracleRun]:
    """Replay ``source``'s oracle along every greedy ``ar`` answer (all turns of each question added up)."""
    runs: dict[str | int, OracleRun] = {}
    for r in baseline:
        if r.error is None:
            runs[r.question_id] = sum((replay(p, out, source, cost) for p, out in
                                       zip(r.prompt_ids, r.token_ids, strict=True)), OracleRun())
    return runs


def _cost_curve(loaded: LoadedModel) -> CostModel:
    cost = adaptive_state(loaded).cost
    if cost is None:
        raise HastenError("no cost curve")
    return cost


def run_bench(
    loaded: LoadedModel | Mapping[str, LoadedModel],
    prompts: list[BenchPrompt],
    methods: list[str] | None = None,
    *,
    draft: LoadedModel | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    warmup: int = 1,
    seed: int = 0,
    progress: bool = True,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Benchmark ``methods`` (default: all) against ``ar`` on ``prompts``; returns the ``results.json`` object.

    ``loaded`` is one model or ``{backend: model}`` (the first is the primary backend). After ``warmup``
    untimed questions, each question is run by every method on every backend in turn, the order rotating from
    one question to the next, all in this process.
    """
    if not prompts:
        raise HastenError("no prompts to benchmark")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise HastenError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if warmup < 0:
        raise HastenError(f"warmup must be >= 0, got {warmup}")
    models = _as_models(loaded)
    primary = next(iter(models))
    params = SamplingParams(temperature, 0, 1.0, seed)
    options = dict(options or {})
    if draft is not None:
        options.setdefault("draft", draft)
    runs, skipped = resolve_methods(methods, models, params, options, draft)
    warnings = [f"skipped {name}: {reason}" for name, reason in skipped.items()]
    if methods is not None and not any(name.partition("@")[0] == BASELINE for name in methods):
        warnings.append(f"added {BASELINE}: it is the baseline every speedup is measured against")
    if not params.greedy:
        warnings.append(f"temperature {temperature} > 0: outputs are samples, so exactness against ar is not checked")
    costs = {backend: _cost_curve(model) for backend, model in models.items()}  # calibrated now, not in a run
    costs_start = {backend: list(cost.millis) for backend, cost in costs.items()}
    # The oracle prices steps with the calibrated curve: the online refinement follows whatever else the
    # machine was doing during the run.
    calibrated = {backend: CostModel(list(cost.widths), costs_start[backend], cost.key)
                  for backend, cost in costs.items()}
    by_label = {run.label: run for run in runs}
    llamacpp = {run.label: LlamaCppAnchor(run.method, models[run.backend]) for run in runs
                if run.method in LLAMACPP_ANCHORS}

    def run(label: str, prompt: BenchPrompt, index: int) -> RunRecord:
        spec = by_label[label]
        question_params = SamplingParams(temperature, 0, 1.0, seed + 1000 * index)
        try:
            return run_question(spec.method, models[spec.backend], prompt, max_new_tokens, question_params, options,
                                draft, label=label, llamacpp=llamacpp.get(label))
        except HastenError as error:
            return RunRecord(prompt.question_id, prompt.category, label, spec.backend, error=str(error))

    labels = list(by_label)
    warm = prompts[:warmup]
    bar = tqdm(total=len(labels) * (len(warm) + len(prompts)), desc="bench", unit="run", file=sys.stderr,
               disable=not progress)
    try:
        for index, prompt in enumerate(warm):
            for label in labels:
                bar.set_postfix_str(f"warm-up {label}")
                run(label, prompt, index)
                bar.update()
        records: dict[str, list[RunRecord]] = {label: [] for label in labels}
        for index, prompt in enumerate(prompts):
            for label in rotated(labels, index):
                bar.set_postfix_str(f"{prompt.question_id} {label}")
                records[label].append(run(label, prompt, index))
                bar.update()
    finally:
        bar.close()
        for anchor in llamacpp.values():
            anchor.close()

    baselines = {backend: {r.question_id: r for r in records[label_for(BASELINE, backend, primary)]}
                 for backend in models}
    primary_ar = baselines[primary]
    exact_checked = params.greedy
    for label, method_records in records.items():
        own = baselines[by_label[label].backend]
        for r in method_records:
            ref = own[r.question_id]
            if exact_checked and r.error is None and ref.error is None:
                r.exact = r.token_ids == ref.token_ids
    categories = list(dict.fromkeys(p.category for p in prompts))
    summary: dict[str, Any] = {}
    for label, method_records in records.items():
        spec = by_label[label]
        own = baselines[spec.backend]
        entry: dict[str, Any] = {"method": spec.method, "backend": spec.backend,
                                 "baseline": label_for(BASELINE, spec.backend, primary)}
        entry |= summarise(method_records, primary_ar, own)
        mismatches = [r.question_id for r in method_records if r.exact is False]
        entry["exact"] = (not mismatches) if exact_checked else None
        entry["mismatches"] = mismatches
        entry["errors"] = [{"question_id": r.question_id, "error": r.error} for r in method_records if r.error]
        if exact_checked and spec.backend != primary:
            same = [r.token_ids == primary_ar[r.question_id].token_ids for r in method_records
                    if r.error is None and primary_ar[r.question_id].error is None]
            entry["same_as_primary_ar"] = sum(same) / len(same) if same else None
        drafted = [r.drafted_tokens for r in method_records if r.error is None]
        if drafted and None not in drafted and sum(d or 0 for d in drafted):
            accepted = sum(r.accepted_drafts or 0 for r in method_records if r.error is None)
            entry["draft_acceptance"] = accepted / sum(d or 0 for d in drafted)
        else:
            entry["draft_acceptance"] = None
        stats = _method_stats(method_records)
        entry["method_stats"] = stats
        entry["mean_drafted"] = stats.get("mean_drafted")
        if entry["mean_drafted"] is None and None not in drafted and entry["target_passes"]:
            entry["mean_drafted"] = sum(d or 0 for d in drafted) / entry["target_passes"]
        entry["plain_steps"] = stats.get("plain_steps", 1.0 if spec.method == BASELINE else None)
        source = source_for(spec.method, models[spec.backend], params, options_for(spec.method, options)) \
            if exact_checked else None
        oracle = oracle_runs(source, records[entry["baseline"]], calibrated[spec.backend]) if source else {}
        entry |= _oracle(oracle, [r.question_id for r in method_records]) if source else \
            {"oracle": None, "oracle_mean_accepted": None}
        parts: dict[str, Any] = {}
        for category in categories:
            chosen = [r for r in method_records if r.category == category]
            part = summarise(chosen, primary_ar, own)
            parts[category] = {key: part[key] for key in ("speedup", "speedup_own", "mean_accepted", "tokens_per_s")}
            parts[category]["oracle"] = _oracle(oracle, [r.question_id for r in chosen])["oracle"] if source else None
        entry["categories"] = parts
        summary[label] = entry
    errors = sum(len(entry["errors"]) for entry in summary.values())
    if errors:
        warnings.append(f"{errors} run(s) failed; see 'errors' per method")
    backends = {}
    for backend, model in models.items():
        cost = costs[backend]
        backends[backend] = {
            "model": model.name, "threads": getattr(model.backend, "threads", None) or torch.get_num_threads(),
            "baseline": label_for(BASELINE, backend, primary),
            "cost": {"widths": list(cost.widths), "millis": costs_start[backend], "millis_end": list(cost.millis),
                     "relative": [m / costs_start[backend][0] for m in costs_start[backend]], "key": cost.key},
        }
    baseline_labels = {entry["baseline"] for entry in summary.values()}
    return {
        "model": models[primary].name,
        "backend": primary,
        "backends": backends,
        "draft_model": draft.name if draft is not None else None,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "seed": seed,
        "warmup": len(warm),
        "prompts": len(prompts),
        "categories": categories,
        "exactness_checked": exact_checked,
        "methods": summary,
        "skipped": skipped,
        "warnings": warnings,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                    "backend": primary, "backends": list(models),
                    "llamacpp_threads": backends.get("llamacpp", {}).get("threads")},
        "records": [asdict(r) | ({} if r.method in baseline_labels else {"prompt_ids": None})
                    for method_records in records.values() for r in method_records],
    }
