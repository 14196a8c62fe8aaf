"""Run every method on every prompt in one process, interleaved, and summarise speed and exactness against ``ar``."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from hasten.api import generate, prompt_ids
from hasten.bench.anchors import HF_ANCHORS, anchor_available, run_anchor
from hasten.bench.prompts import BenchPrompt
from hasten.errors import HastenError
from hasten.methods import METHODS, build_proposer, options_for
from hasten.models import LoadedModel
from hasten.sampling import SamplingParams

BASELINE = "ar"


@dataclass
class RunRecord:
    """One method on one question (all its turns): what came out and how long it took."""

    question_id: str | int
    category: str
    method: str
    wall_s: float = 0.0
    new_tokens: int = 0
    target_passes: int | None = 0
    drafted_tokens: int | None = 0
    accepted_drafts: int | None = 0
    token_ids: list[list[int]] = field(default_factory=list)  # one list per turn
    exact: bool | None = None
    error: str | None = None


def default_methods() -> list[str]:
    """Every registered method and every transformers anchor (those that cannot run are skipped later)."""
    return [*METHODS, *HF_ANCHORS]


def resolve_methods(requested: list[str] | None, loaded: LoadedModel, params: SamplingParams,
                    options: dict[str, Any], draft: LoadedModel | None) -> tuple[list[str], dict[str, str]]:
    """Split the requested methods into those that can run (``ar`` always first) and skipped ones with a reason."""
    names = list(dict.fromkeys(requested if requested is not None else default_methods()))
    if not names:
        raise HastenError("no methods to benchmark")
    runnable: list[str] = []
    skipped: dict[str, str] = {}
    for name in names:
        if name in HF_ANCHORS:
            reason = anchor_available(name, draft)
        elif name not in METHODS:
            known = ", ".join([*METHODS, *HF_ANCHORS])
            reason = f"{name!r} is not a registered method (known: {known})"
        else:
            try:
                build_proposer(name, loaded, params, None, **options_for(name, options))
                reason = None
            except HastenError as error:
                reason = str(error)
        if reason is None:
            runnable.append(name)
        else:
            skipped[name] = reason
    if BASELINE in runnable:
        runnable.remove(BASELINE)
    return [BASELINE, *runnable], skipped


def conversation_ids(loaded: LoadedModel, messages: list[dict[str, str]]) -> list[int]:
    """Prompt ids of a conversation: the chat template, or the turns joined by blank lines if there is none."""
    if getattr(loaded.tokenizer, "chat_template", None):
        return prompt_ids(loaded, messages)
    return prompt_ids(loaded, "\n\n".join(message["content"] for message in messages), chat=False)


def run_question(method: str, loaded: LoadedModel, prompt: BenchPrompt, max_new_tokens: int,
                 params: SamplingParams, options: dict[str, Any], draft: LoadedModel | None) -> RunRecord:
    """All turns of one question with one method; each later turn sees the method's own earlier answers.

    Only the generation call is timed (``perf_counter`` around it, prefill included), the same for every method.
    """
    record = RunRecord(prompt.question_id, prompt.category, method)
    anchor = method in HF_ANCHORS
    if anchor:
        record.drafted_tokens = record.accepted_drafts = None
    messages: list[dict[str, str]] = []
    for turn_index, turn in enumerate(prompt.turns):
        messages.append({"role": "user", "content": turn})
        ids = conversation_ids(loaded, messages)
        seed = None if params.seed is None else params.seed + turn_index
        turn_params = SamplingParams(params.temperature, params.top_k, params.top_p, seed)
        began = time.perf_counter()
        if anchor:
            out = run_anchor(method, loaded, ids, max_new_tokens, turn_params, draft)
            record.wall_s += time.perf_counter() - began
            tokens, passes = out.token_ids, out.target_passes
        else:
            result = generate(loaded, ids, method, max_new_tokens=max_new_tokens, temperature=params.temperature,
                              top_k=params.top_k, top_p=params.top_p, seed=seed, **options_for(method, options))
            record.wall_s += time.perf_counter() - began
            tokens, passes = result.token_ids, result.target_passes
            record.drafted_tokens += result.drafted_tokens
            record.accepted_drafts += result.accepted_drafts
        record.token_ids.append(tokens)
        record.new_tokens += len(tokens)
        record.target_passes += passes
        messages.append({"role": "assistant", "content": loaded.tokenizer.decode(tokens, skip_special_tokens=True)})
    return record


def rotated(methods: list[str], shift: int) -> list[str]:
    """The methods in a rotating order, so no method always runs first (or right after another)."""
    shift %= len(methods)
    return methods[shift:] + methods[:shift]


def _ratio(numerator: float, denominator: float | None) -> float | None:
    return numerator / denominator if denominator else None


def summarise(records: list[RunRecord], baseline: dict[str | int, RunRecord]) -> dict[str, Any]:
    """Aggregate one method's records: tokens/s and mean accepted over totals, speedup as a median of ratios."""
    good = [r for r in records if r.error is None and baseline.get(r.question_id) and not baseline[r.question_id].error]
    tokens = sum(r.new_tokens for r in good)
    wall = sum(r.wall_s for r in good)
    passes = None if any(r.target_passes is None for r in good) else sum(r.target_passes for r in good)
    ratios = [baseline[r.question_id].wall_s / r.wall_s for r in good if r.wall_s > 0]
    return {
        "tokens_per_s": _ratio(tokens, wall) or 0.0,
        "speedup": statistics.median(ratios) if ratios else None,
        "mean_accepted": _ratio(tokens, passes),
        "target_passes": passes,
        "new_tokens": tokens,
        "wall_s": wall,
    }


def run_bench(
    loaded: LoadedModel,
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

    After ``warmup`` untimed questions, each question is run by every method in turn, the order rotating from
    one question to the next, all in this process on the same loaded model.
    """
    if not prompts:
        raise HastenError("no prompts to benchmark")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise HastenError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if warmup < 0:
        raise HastenError(f"warmup must be >= 0, got {warmup}")
    params = SamplingParams(temperature, 0, 1.0, seed)
    options = dict(options or {})
    if draft is not None:
        options.setdefault("draft", draft)
    runnable, skipped = resolve_methods(methods, loaded, params, options, draft)
    warnings = [f"skipped {name}: {reason}" for name, reason in skipped.items()]
    if methods is not None and BASELINE not in methods:
        warnings.append(f"added {BASELINE}: it is the baseline every speedup is measured against")
    if not params.greedy:
        warnings.append(f"temperature {temperature} > 0: outputs are samples, so exactness against ar is not checked")

    def run(method: str, prompt: BenchPrompt, index: int) -> RunRecord:
        question_params = SamplingParams(temperature, 0, 1.0, seed + 1000 * index)
        try:
            return run_question(method, loaded, prompt, max_new_tokens, question_params, options, draft)
        except HastenError as error:
            return RunRecord(prompt.question_id, prompt.category, method, error=str(error))

    warm = prompts[:warmup]
    bar = tqdm(total=len(runnable) * (len(warm) + len(prompts)), desc="bench", unit="run", file=sys.stderr,
               disable=not progress)
    for index, prompt in enumerate(warm):
        for method in runnable:
            bar.set_postfix_str(f"warm-up {method}")
            run(method, prompt, index)
            bar.update()
    records: dict[str, list[RunRecord]] = {method: [] for method in runnable}
    for index, prompt in enumerate(prompts):
        for method in rotated(runnable, index):
            bar.set_postfix_str(f"{prompt.question_id} {method}")
            records[method].append(run(method, prompt, index))
            bar.update()
    bar.close()

    baseline = {r.question_id: r for r in records[BASELINE]}
    exact_checked = params.greedy
    for method_records in records.values():
        for r in method_records:
            ref = baseline[r.question_id]
            if exact_checked and r.error is None and ref.error is None:
                r.exact = r.token_ids == ref.token_ids
    summary: dict[str, Any] = {}
    for method, method_records in records.items():
        entry = summarise(method_records, baseline)
        mismatches = [r.question_id for r in method_records if r.exact is False]
        entry["exact"] = (not mismatches) if exact_checked else None
        entry["mismatches"] = mismatches
        entry["errors"] = [{"question_id": r.question_id, "error": r.error} for r in method_records if r.error]
        drafted = [r.drafted_tokens for r in method_records if r.error is None]
        if drafted and None not in drafted and sum(drafted):
            accepted = sum(r.accepted_drafts for r in method_records if r.error is None)
            entry["draft_acceptance"] = accepted / sum(drafted)
        else:
            entry["draft_acceptance"] = None
        categories: dict[str, Any] = {}
        for category in dict.fromkeys(p.category for p in prompts):
            part = summarise([r for r in method_records if r.category == category], baseline)
            categories[category] = {key: part[key] for key in ("speedup", "mean_accepted", "tokens_per_s")}
        entry["categories"] = categories
        summary[method] = entry
    errors = sum(len(entry["errors"]) for entry in summary.values())
    if errors:
        warnings.append(f"{errors} run(s) failed; see 'errors' per method")
    return {
        "model": loaded.name,
        "draft_model": draft.name if draft is not None else None,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "seed": seed,
        "warmup": len(warm),
        "prompts": len(prompts),
        "categories": list(dict.fromkeys(p.category for p in prompts)),
        "exactness_checked": exact_checked,
        "methods": summary,
        "skipped": skipped,
        "warnings": warnings,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                    "backend": loaded.backend.backend},
        "records": [asdict(r) for method_records in records.values() for r in method_records],
    }
