"""Run every method on every prompt and backend in one process, interleaved, and summarise speed and exactness.

The model may be loaded on several backends (the first is the primary). Every method runs on each: ``pld`` on
the primary backend, ``pld@transformers`` on another. A method's exactness is checked against ``ar`` on its own
backend; ``speedup`` is against the primary backend's ``ar`` and ``speedup_own`` against its own backend's.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from tqdm import tqdm

from hasten.adaptive import adaptive_state
from hasten.adaptive.cost import CostModel, clock_for
from hasten.api import generate, prompt_ids
from hasten.bench.anchors import (
    ANCHORS,
    LLAMACPP_ANCHORS,
    LlamaCppAnchor,
    anchor_available,
    anchor_backend,
    run_hf_anchor,
)
from hasten.bench.load import OthersClock, busy_note
from hasten.bench.machine import backend_info, machine_info
from hasten.bench.oracle import source_for
from hasten.bench.prompts import BenchPrompt
from hasten.bench.records import BASELINE, Run, RunRecord, add_stats, decode_fields, label_for
from hasten.bench.scoring import baselines_by_backend, hf_reference, score_exactness
from hasten.bench.structured import answer_error, is_constrained
from hasten.bench.summary import References, oracle_runs, summarise_method
from hasten.errors import HastenError
from hasten.grammar import grammar_tokenizer
from hasten.methods import METHODS, build_proposer, options_for
from hasten.models import LoadedModel
from hasten.sampling import SamplingParams

__all__ = ["BASELINE", "Run", "RunRecord", "conversation_ids", "label_for", "resolve_methods", "rotated",
           "run_bench", "run_question"]


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


def run_question(method: str, loaded: LoadedModel, prompt: BenchPrompt, max_new_tokens: int,
                 params: SamplingParams, options: dict[str, Any], draft: LoadedModel | None, *,
                 label: str | None = None, llamacpp: LlamaCppAnchor | None = None) -> RunRecord:
    """All turns of one question with one method; each later turn sees the method's own earlier answers.

    Only the generation call is timed (``perf_counter`` around it, prefill included), the same for every method;
    on CUDA the clock first waits for the device's queued work. ``prefill_s`` adds up the target's pass over each
    turn's prompt, the one that yields its first new token (hasten's ``GenerationResult.prefill_s``, the anchors'
    ``AnchorOutput.prefill_s``; None if a turn's was not measured). A question with a ``response_format`` passes it to
    every turn's generation, and each answer is checked against it (``json_valid``, ``json_error``).
    """
    record = RunRecord(prompt.question_id, prompt.category, label or method, loaded.backend.backend)
    clock = clock_for(getattr(loaded.backend, "device", "cpu"))
    others = OthersClock()
    anchor = method in ANCHORS
    constrained = is_constrained(prompt.response_format)
    if anchor and constrained:
        raise HastenError(f"{method} cannot follow a response_format (question {prompt.question_id!r})")
    formats = {} if prompt.response_format is None else {"response_format": prompt.response_format}
    invalid: list[str] = []
    passes_total = drafted = accepted = 0
    draft_total = 0.0
    prefill_total: float | None = 0.0  # None once a turn's prefill was not measured
    messages: list[dict[str, str]] = []
    for turn_index, turn in enumerate(prompt.turns):
        messages.append({"role": "user", "content": turn})
        ids = conversation_ids(loaded, messages)
        seed = None if params.seed is None else params.seed + turn_index
        turn_params = SamplingParams(params.temperature, params.top_k, params.top_p, seed)
        others.start()  # this process's own work (the untimed set-up below included) never counts as others'
        if anchor:
            began = clock()
            if method in LLAMACPP_ANCHORS:
                if llamacpp is None:
                    raise HastenError(f"{method} needs its llama_cpp.Llama")
                out = llamacpp.run(ids, max_new_tokens, turn_params)
            else:
                out = run_hf_anchor(method, loaded, ids, max_new_tokens, turn_params, draft)
            record.wall_s += clock() - began
            tokens, passes = out.token_ids, out.target_passes
            prefill_total = None if prefill_total is None or out.prefill_s is None else prefill_total + out.prefill_s
        else:
            forget_prompts = getattr(loaded.backend, "forget_prompts", None)
            if forget_prompts is not None:  # every run prefills its whole prompt, as the llama.cpp anchors do
                forget_prompts()
            began = clock()
            result = generate(loaded, ids, method, max_new_tokens=max_new_tokens, temperature=params.temperature,
                              top_k=params.top_k, top_p=params.top_p, seed=seed, **formats,
                              **options_for(method, options))
            record.wall_s += clock() - began
            tokens, passes = result.token_ids, result.target_passes
            draft_total += result.draft_s
            prefill_total = None if prefill_total is None else prefill_total + result.prefill_s
            drafted += result.drafted_tokens
            accepted += result.accepted_drafts
            add_stats(record, result.method_stats, passes, passes_total)
        record.others_cpu_s = _added(record.others_cpu_s, others.stop())
        record.prompt_ids.append(ids)
        record.token_ids.append(tokens)
        record.new_tokens += len(tokens)
        passes_total += passes
        answer = str(loaded.tokenizer.decode(tokens, skip_special_tokens=True))
        messages.append({"role": "assistant", "content": answer})
        if constrained and (why := answer_error(answer, prompt.response_format or {})) is not None:
            invalid.append(why if len(prompt.turns) == 1 else f"turn {turn_index + 1}: {why}")
    record.target_passes = passes_total
    if constrained:
        record.json_valid, record.json_error = not invalid, (invalid[0] if invalid else None)
    record.prefill_s = prefill_total
    if anchor:
        record.drafted_tokens = record.accepted_drafts = record.draft_s = None
    else:
        record.drafted_tokens, record.accepted_drafts = drafted, accepted
        record.draft_s = draft_total
    return record


def _added(total: float | None, more: float | None) -> float | None:
    return None if total is None or more is None else total + more


def rotated(methods: list[str], shift: int) -> list[str]:
    """The methods in a rotating order, so no method always runs first (or right after another)."""
    shift %= len(methods)
    return methods[shift:] + methods[:shift]


def _cost_curve(loaded: LoadedModel) -> CostModel:
    cost = adaptive_state(loaded).cost
    if cost is None:
        raise HastenError("no cost curve")
    return cost


def run_all(runs: list[Run], models: Mapping[str, LoadedModel], prompts: list[BenchPrompt], *, warmup: int,
            max_new_tokens: int, temperature: float, seed: int, options: dict[str, Any], draft: LoadedModel | None,
            progress: bool) -> dict[str, list[RunRecord]]:
    """Every run on every question, by label: after ``warmup`` untimed questions, each question is run by every
    run in turn, the order rotating from one question to the next. A run that fails records its error. Anchors
    leave out constrained questions (``unconstrained_anchors``): they get no record there. The grammar's view of
    each tokenizer is built before any timing (4 s on Gemma 3: it once fell in whichever run came first)."""
    by_label = {run.label: run for run in runs}
    llamacpp = {run.label: LlamaCppAnchor(run.method, models[run.backend]) for run in runs
                if run.method in LLAMACPP_ANCHORS}

    def one(label: str, prompt: BenchPrompt, index: int) -> RunRecord | None:
        spec = by_label[label]
        if spec.method in ANCHORS and is_constrained(prompt.response_format):
            return None
        question_params = SamplingParams(temperature, 0, 1.0, seed + 1000 * index)
        try:
            return run_question(spec.method, models[spec.backend], prompt, max_new_tokens, question_params, options,
                                draft, label=label, llamacpp=llamacpp.get(label))
        except HastenError as error:
            return RunRecord(prompt.question_id, prompt.category, label, spec.backend, error=str(error))

    if any(is_constrained(prompt.response_format) for prompt in prompts):  # built once per tokenizer, untimed
        for backend in {run.backend for run in runs if run.method not in ANCHORS}:
            try:
                grammar_tokenizer(models[backend].tokenizer, models[backend].vocab_size)
            except HastenError:  # no grammar for this tokenizer: each constrained run records the error itself
                pass
    labels = list(by_label)
    warm = prompts[:warmup]
    bar = tqdm(total=len(labels) * (len(warm) + len(prompts)), desc="bench", unit="run", file=sys.stderr,
               disable=not progress)
    try:
        for index, prompt in enumerate(warm):
            for label in labels:
                bar.set_postfix_str(f"warm-up {label}")
                one(label, prompt, index)
                bar.update()
        records: dict[str, list[RunRecord]] = {label: [] for label in labels}
        for index, prompt in enumerate(prompts):
            for label in rotated(labels, index):
                bar.set_postfix_str(f"{prompt.question_id} {label}")
                if (record := one(label, prompt, index)) is not None:
                    records[label].append(record)
                bar.update()
    finally:
        bar.close()
        for anchor in llamacpp.values():
            anchor.close()
    return records


def unconstrained_anchors(runs: list[Run], prompts: list[BenchPrompt], skipped: dict[str, str],
                          warnings: list[str]) -> list[Run]:
    """The runs, anchors left out of constrained questions: other libraries' decoding is not constrained by a
    ``response_format``. With only constrained questions the anchors are skipped; else a warning says which
    questions they leave out (their rows measure the others)."""
    constrained = [p.question_id for p in prompts if is_constrained(p.response_format)]
    anchors = [run.label for run in runs if run.method in ANCHORS]
    if not constrained or not anchors:
        return runs
    reason = "its library's decoding does not follow a response_format"
    if len(constrained) == len(prompts):
        skipped.update({label: f"{reason}, and every question has one" for label in anchors})
        return [run for run in runs if run.method not in ANCHORS]
    warnings.append(f"{', '.join(anchors)} left out the {len(constrained)} question(s) with a response_format "
                    f"({', '.join(map(str, constrained))}): {reason}")
    return runs


def _check_arguments(prompts: list[BenchPrompt], max_new_tokens: int, warmup: int) -> None:
    if not prompts:
        raise HastenError("no prompts to benchmark")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise HastenError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if warmup < 0:
        raise HastenError(f"warmup must be >= 0, got {warmup}")


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

    ``loaded`` is one model or ``{backend: model}`` (the first is the primary backend). Runs every method
    (``run_all``), scores the outputs against ``ar`` (``score_exactness``) and summarises each method
    (``summarise_method``; beside exactness, how often each equals ``hf_generate`` when that anchor ran under
    greedy decoding), all in this process.
    """
    _check_arguments(prompts, max_new_tokens, warmup)
    models = _as_models(loaded)
    primary = next(iter(models))
    params = SamplingParams(temperature, 0, 1.0, seed)
    options = dict(options or {})
    if draft is not None:
        options.setdefault("draft", draft)
    runs, skipped = resolve_methods(methods, models, params, options, draft)
    anchor_notes: list[str] = []
    runs = unconstrained_anchors(runs, prompts, skipped, anchor_notes)
    warnings = [f"skipped {name}: {reason}" for name, reason in skipped.items()] + anchor_notes
    if methods is not None and not any(name.partition("@")[0] == BASELINE for name in methods):
        warnings.append(f"added {BASELINE}: it is the baseline every speedup is measured against")
    if not params.greedy:
        warnings.append(f"temperature {temperature} > 0: outputs are samples, so exactness against ar is not checked")
    costs = {backend: _cost_curve(model) for backend, model in models.items()}  # calibrated now, not in a run
    # The oracle prices steps with the calibrated curve: the online refinement follows whatever else the
    # machine was doing during the run.
    calibrated = {backend: cost.calibration() for backend, cost in costs.items()}

    records = run_all(runs, models, prompts, warmup=warmup, max_new_tokens=max_new_tokens, temperature=temperature,
                      seed=seed, options=options, draft=draft, progress=progress)

    by_label = {run.label: run for run in runs}
    baselines = baselines_by_backend(records, list(models), primary)
    exact_checked = params.greedy
    if exact_checked:
        score_exactness(records, by_label, baselines)
    categories = list(dict.fromkeys(p.category for p in prompts))
    hf_greedy = hf_reference(records) if exact_checked else None
    summary: dict[str, Any] = {}
    for label, method_records in records.items():
        run = by_label[label]
        own_label = label_for(BASELINE, run.backend, primary)
        source = source_for(run.method, models[run.backend], params, options_for(run.method, options)) \
            if exact_checked else None
        oracle = oracle_runs(source, records[own_label], calibrated[run.backend]) if source else None
        refs = References(baselines[primary], baselines[run.backend], own_label, hf_greedy)
        summary[label] = summarise_method(run, method_records, refs, primary=primary, exact_checked=exact_checked,
                                          oracle=oracle, categories=categories)
    errors = sum(len(entry["errors"]) for entry in summary.values())
    if errors:
        warnings.append(f"{errors} run(s) failed; see 'errors' per method")
    if (busy := busy_note(asdict(r) for method_records in records.values() for r in method_records)) is not None:
        warnings.append(busy)
    backends = backend_info(models, costs, calibrated, primary)
    baseline_labels = {entry["baseline"] for entry in summary.values()}
    return {
        "model": models[primary].name,
        "backend": primary,
        "backends": backends,
        "draft_model": draft.name if draft is not None else None,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "seed": seed,
        "warmup": len(prompts[:warmup]),
        "prompts": len(prompts),
        "categories": categories,
        "constrained": [p.question_id for p in prompts if is_constrained(p.response_format)],
        "exactness_checked": exact_checked,
        "methods": summary,
        "skipped": skipped,
        "warnings": warnings,
        "machine": machine_info(primary, backends),
        "records": [asdict(r) | decode_fields(r) | ({} if r.method in baseline_labels else {"prompt_ids": None})
                    for method_records in records.values() for r in method_records],
    }
