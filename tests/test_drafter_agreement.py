"""Bench-like agreement of the drafters (``hasten.training.agreement``) and the figure the shipped draft records."""

from __future__ import annotations

import json

import pytest
import torch

from hasten.api import generate
from hasten.draft.model import (
    CONFIG,
    HELD_OUT_TOP1,
    SHIPPED_DRAFT,
    bench_like_agreement,
    build_draft,
    validation_agreement,
)
from hasten.training.agreement import Counts, draft_counts, greedy_answers, head_counts, measure, sample_by_category
from tests.conftest import random_prompts, tiny_loaded
from tests.test_redrafter import random_head


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded("llama", seed=4)


def full_pass_argmax(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens])).logits[0].argmax(-1)


def test_a_draft_equal_to_the_target_agrees_wherever_the_target_does(loaded):
    draft = build_draft(loaded.model, torch.arange(64), [0, 1])  # both layers, every row: the target itself
    for prompt in random_prompts(4, seed=1):
        answer = generate(loaded, prompt, "ar", max_new_tokens=12, temperature=0.0).token_ids
        hits, positions, outside = draft_counts(draft, torch.arange(64), prompt, answer)
        want = full_pass_argmax(loaded.model, prompt + answer)[len(prompt) - 1 : -1]
        assert positions == [len(answer)] and outside == 0
        assert hits == [int((want == torch.tensor(answer)).sum())] and hits[0] >= len(answer) - 1


def test_tokens_outside_the_draft_vocabulary_are_misses(loaded):
    prompt = random_prompts(1, seed=2)[0]
    answer = generate(loaded, prompt, "ar", max_new_tokens=12, temperature=0.0).token_ids
    kept = torch.tensor([t for t in range(64) if t != answer[0]])
    draft = build_draft(loaded.model, kept, [0, 1])
    hits, _, outside = draft_counts(draft, kept, prompt, answer)
    full = draft_counts(build_draft(loaded.model, torch.arange(64), [0, 1]), torch.arange(64), prompt, answer)
    missing = sum(t == answer[0] for t in answer)
    assert outside == missing and hits[0] <= full[0][0] - missing


def reference_head_counts(model, head, prompt: list[int], answer: list[int], depth: int) -> tuple[list, list]:
    """Position by position: h_t and tokens t+1..t+d give a guess at token t+d+1."""
    tokens = prompt + answer
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([tokens])).last_hidden_state[0]
    hits, positions = [0] * depth, [0] * depth
    for t in range(len(prompt) - 1, len(tokens)):
        state = head.init_state(1)
        for d in range(1, depth + 1):
            if t + d + 1 > len(tokens) - 1:
                break
            state = head.step(state, torch.tensor([tokens[t + d]]))
            guess = int(head.draft_ids[head.logits(hidden[t : t + 1], state).argmax(-1)])
            positions[d - 1] += 1
            hits[d - 1] += guess == tokens[t + d + 1]
    return hits, positions


def test_head_counts_match_a_position_by_position_reference(loaded):
    head = random_head(seed=3).attach(loaded.model)
    for prompt in random_prompts(3, seed=5):
        answer = generate(loaded, prompt, "ar", max_new_tokens=14, temperature=0.0).token_ids
        with torch.no_grad():
            hits, positions, _ = head_counts(loaded.model, head, prompt, answer, depth=3)
        assert (hits, positions) == reference_head_counts(loaded.model, head, prompt, answer, 3)
        assert positions[0] == len(answer) - 1 and positions == sorted(positions, reverse=True)


def test_a_label_outside_the_head_vocabulary_never_counts_as_a_hit(loaded):
    prompt = random_prompts(1, seed=6)[0]
    answer = generate(loaded, prompt, "ar", max_new_tokens=16, temperature=0.0).token_ids
    labels = (prompt + answer)[len(prompt) + 1 :]  # depth-1 labels: tokens t+2
    favourite = labels[0]
    others = [t for t in range(64) if t not in labels][:47]
    head = random_head(draft_vocab=1 + len(others), seed=2)
    head.draft_ids.copy_(torch.tensor([favourite, *others]))
    with torch.no_grad():
        head.vocab_bias[0] = 1e4  # always guesses draft row 0, the favourite
    head.attach(loaded.model)
    with torch.no_grad():
        hits, positions, outside = head_counts(loaded.model, head, prompt, answer, depth=1)
    assert hits == [labels.count(favourite)] and positions == [len(labels)]
    assert outside == len(labels) - labels.count(favourite)


def test_measure_pools_categories(loaded):
    draft = build_draft(loaded.model, torch.arange(64), [0])
    head = random_head(seed=1).attach(loaded.model)
    items = [{"category": c, "prompt": p,
              "answer_ids": generate(loaded, p, "ar", max_new_tokens=10, temperature=0.0).token_ids}
             for c, p in zip("aabb", random_prompts(4, seed=7), strict=True)]
    report = measure(loaded, items, draft, torch.arange(64), head, depth=2, progress=False)
    assert set(report) == {"all", "a", "b"}
    for drafter in ("draft", "head"):
        assert report["all"][drafter]["positions"] == [
            x + y for x, y in zip(report["a"][drafter]["positions"], report["b"][drafter]["positions"], strict=True)]
    assert report["all"]["draft"]["positions"] == [sum(len(i["answer_ids"]) for i in items)]
    assert 0 <= report["all"]["draft"]["top1"][0] <= 1 and len(report["all"]["head"]["top1"]) == 2
    assert "draft" not in measure(loaded, items[:1], head=head, progress=False)["all"]


def test_counts_report():
    counts = Counts()
    counts.add([3, 1], [4, 2], 1)
    counts.add([1, 1], [4, 2], 0)
    assert counts.report() == {"top1": [0.5, 0.5], "positions": [8, 4], "outside_vocab": 0.125}


def test_sample_by_category_is_seeded_and_capped():
    rows = [{"category": c, "id": f"{c}{i}"} for c in "zab" for i in range(5)]
    first = sample_by_category(rows, 2, seed=1)
    assert first == sample_by_category(rows, 2, seed=1) and [r["category"] for r in first] == list("aabbzz")
    assert len(sample_by_category(rows, 9)) == 15
    assert {r["id"] for r in sample_by_category(rows, 2, seed=2)} != {r["id"] for r in first}


def test_greedy_answers_are_the_ar_answers(loaded):
    prompts = random_prompts(3, seed=8)
    want = [generate(loaded, p, "ar", max_new_tokens=9, temperature=0.0).token_ids for p in prompts]
    assert greedy_answers(loaded, prompts, 9, batch_size=2, progress=False) == want


def test_bench_like_agreement_reads_the_config(tmp_path):
    (tmp_path / CONFIG).write_text(json.dumps({"history": [{"val_top1": 0.6}]}))
    assert bench_like_agreement(tmp_path) is None and validation_agreement(tmp_path) == 0.6
    other = tmp_path / "measured"
    other.mkdir()
    (other / CONFIG).write_text(json.dumps({"history": [{"val_top1": 0.6}], HELD_OUT_TOP1: 0.41}))
    assert bench_like_agreement(other) == 0.41


def test_the_shipped_draft_records_its_bench_like_agreement():
    config = json.loads((SHIPPED_DRAFT / CONFIG).read_text())
    value = bench_like_agreement()
    assert value == config[HELD_OUT_TOP1] and 0 < value < 1
    by_category = config["held_out_top1_by_category"]
    assert set(by_category) == {"chat", "code", "math", "qa", "rag", "structured", "summarization", "translation"}
    assert min(by_category.values()) <= value <= max(by_category.values())
