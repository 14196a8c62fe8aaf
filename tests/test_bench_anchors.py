"""transformers' own speculative decoding beside hasten's in ``hasten bench``: ``hf_pld`` (its prompt lookup) and
``hf_assisted`` (its assisted generation with the same draft) run by default on transformers, behind the
backend's ``generate_ids``, their outputs are recorded, and ``auto`` is reported against the best of them."""

from __future__ import annotations

import time

import pytest
from conftest import greedy_reference, tiny_loaded

from hasten.backends.transformers.generate import generate_ids, generation_config
from hasten.bench import BenchPrompt, run_bench
from hasten.bench.records import RunRecord
from hasten.bench.report import anchor_lines, markdown
from hasten.bench.runner import resolve_methods
from hasten.bench.summary import against_anchors
from hasten.sampling import SamplingParams

PROMPTS = [
    BenchPrompt(1, "copy", ("w5 w6 w7 w8 w9 w5 w6 w7 w8 w9 w5 w6",)),
    BenchPrompt("two-turn", "chat", ("w10 w11 w12 w13 w10 w11", "w20 w21 w22")),
    BenchPrompt(3, "copy", ("w30 w31 w32 w30 w31 w32 w30",)),
]


def test_the_backend_runs_transformers_prompt_lookup_and_assisted_generation():
    target, draft = tiny_loaded(seed=0), tiny_loaded(seed=1)
    prompt = [5, 6, 7, 8, 9, 5, 6, 7, 8]
    plain = greedy_reference(target.model, prompt, 8)
    for lookup, assistant in ((None, None), (10, None), (None, draft.model)):
        config = generation_config(8, SamplingParams(), [1], 0, prompt_lookup=lookup)
        out = generate_ids(target.model, prompt, config, time.perf_counter, assistant=assistant)
        assert out.token_ids == plain, (lookup, assistant is not None)
        assert out.forward_calls is not None and 1 <= out.forward_calls <= len(plain)
        assert out.prefill_s is not None and out.prefill_s > 0
        assert not target.model._forward_hooks and not target.model._forward_pre_hooks


def test_hf_pld_and_hf_assisted_run_by_default_on_transformers():
    target, draft = tiny_loaded(seed=0), tiny_loaded(seed=1)
    runs, skipped = resolve_methods(None, {"transformers": target}, SamplingParams(), {"draft": draft}, draft)
    labels = [run.label for run in runs]
    assert "auto" in labels and "hf_pld" in labels and "hf_assisted" in labels
    assert "hf_pld" not in skipped and "hf_assisted" not in skipped


@pytest.fixture(scope="module")
def results():
    return run_bench(tiny_loaded(seed=0), PROMPTS, ["ar", "auto", "hf_pld", "hf_assisted"], draft=tiny_loaded(seed=1),
                     max_new_tokens=6, warmup=0, progress=False)


def test_the_anchors_outputs_are_recorded(results):
    records = {(r["method"], r["question_id"]): r for r in results["records"]}
    for anchor in ("hf_pld", "hf_assisted"):
        entry = results["methods"][anchor]
        assert entry["errors"] == [] and entry["exact"] is True, anchor  # greedy: ar's tokens, turn for turn
        assert entry["speedup_basis"] == "per token" and entry["speedup_covers"] == [3, 3]
        for prompt in PROMPTS:
            mine, ar = records[(anchor, prompt.question_id)], records[("ar", prompt.question_id)]
            assert len(mine["token_ids"]) == len(prompt.turns) and mine["token_ids"] == ar["token_ids"]
            assert mine["new_tokens"] == sum(len(turn) for turn in mine["token_ids"]) > 0
            assert mine["target_passes"] > 0 and mine["wall_s"] > 0


def test_auto_is_reported_against_the_best_anchor(results, tmp_path):
    lines = anchor_lines(results)
    assert len(lines) == 1 and lines[0].startswith("auto against the best anchor, hf_")
    assert "hf_pld " in lines[0] and "hf_assisted " in lines[0] and lines[0].count("x/tok (3/3)") == 2
    report = markdown(results)
    assert "## auto against the anchors" in report and f"- {lines[0]}" in report
    assert anchor_lines({**results, "methods": {k: v for k, v in results["methods"].items()
                                                if not k.startswith("hf_")}}) == []


def record(question: int, method: str, wall: float, tokens: int) -> RunRecord:
    return RunRecord(question, "chat", method, "transformers", wall_s=wall, new_tokens=tokens, token_ids=[[5] * tokens])


def test_against_anchors_puts_the_best_anchor_first():
    auto = [record(1, "auto", 1.0, 10), record(2, "auto", 2.0, 20)]
    anchors = {"hf_assisted": [record(1, "hf_assisted", 4.0, 10), record(2, "hf_assisted", 8.0, 20)],
               "hf_pld": [record(1, "hf_pld", 1.2, 8), record(2, "hf_pld", 3.0, 20)],
               "hf_generate": [RunRecord(1, "chat", "hf_generate", error="boom")]}
    figures = against_anchors(auto, anchors)
    assert list(figures) == ["hf_pld", "hf_assisted", "hf_generate"]  # none compared: last
    # per token: hf_pld 0.15 s against 0.1 s on the first prompt, 0.15 against 0.1 on the second
    assert figures["hf_pld"].value == pytest.approx(1.5) and (figures["hf_pld"].covered, figures["hf_pld"].prompts) \
        == (2, 2)
    assert figures["hf_assisted"].value == pytest.approx(4.0)
    assert figures["hf_generate"].value is None and figures["hf_generate"].covered == 0
