"""hasten bench's speedups never divide the wall times of runs that wrote different tokens: over the prompts where
both wrote the same tokens, or per new token where they cannot be expected to agree; each says what it covers."""

from __future__ import annotations

import pytest

from hasten.bench.records import Run, RunRecord
from hasten.bench.report import decode_table, oracle_table, table
from hasten.bench.summary import PER_TOKEN, SAME_TOKENS, References, speedup_basis, summarise_method


def record(question: int, method: str, wall: float, tokens: list[int], prefill: float = 0.1,
           category: str = "chat", backend: str = "llamacpp") -> RunRecord:
    return RunRecord(question, category, method, backend, wall_s=wall, new_tokens=len(tokens),
                     target_passes=len(tokens), prefill_s=prefill, token_ids=[tokens], draft_s=0.0)


AR = [record(1, "ar", 2.0, [5] * 20), record(2, "ar", 3.0, [6] * 30), record(3, "ar", 1.0, [7] * 10, category="code")]


def summary(records: list[RunRecord], run: Run, *, greedy: bool = True, own: list[RunRecord] | None = None) -> dict:
    primary = {r.question_id: r for r in AR}
    own_by = {r.question_id: r for r in own} if own is not None else primary
    return summarise_method(run, records, References(primary, own_by, "ar"), primary="llamacpp",
                            exact_checked=greedy, oracle=None, categories=["chat", "code"])


def test_the_basis_follows_what_can_be_equal():
    assert speedup_basis(Run("pld", "pld", "llamacpp"), "llamacpp", greedy=True) == SAME_TOKENS
    assert speedup_basis(Run("pld", "pld", "llamacpp"), "llamacpp", greedy=False) == PER_TOKEN  # samples
    assert speedup_basis(Run("llamacpp_pld", "llamacpp_pld", "llamacpp"), "llamacpp", greedy=True) == PER_TOKEN
    assert speedup_basis(Run("hf_pld", "hf_pld", "transformers"), "transformers", greedy=True) == PER_TOKEN
    assert speedup_basis(Run("pld@transformers", "pld", "transformers"), "llamacpp", greedy=True) == PER_TOKEN


def test_a_greedy_method_is_timed_only_where_it_wrote_the_same_tokens():
    pld = [record(1, "pld", 1.0, [5] * 20),  # same tokens, 2x
           record(2, "pld", 0.5, [6] * 12),  # stopped early: 6x on the wall clock, left out
           record(3, "pld", 0.25, [7] * 10, category="code")]  # same tokens, 4x
    entry = summary(pld, Run("pld", "pld", "llamacpp"))
    assert entry["speedup_basis"] == entry["speedup_own_basis"] == SAME_TOKENS
    assert entry["speedup"] == pytest.approx(3.0) and entry["speedup_covers"] == [2, 3]
    assert entry["speedup_own"] == pytest.approx(3.0) and entry["speedup_own_covers"] == [2, 3]
    # decode ms/token: ar (2.0 - 0.1) / 19 = 100 ms, pld (1.0 - 0.1) / 19; the second prompt is left out here too
    assert entry["decode_speedup"] == pytest.approx((1.9 / 0.9 + 0.9 / 0.15) / 2)
    assert entry["decode_speedup_covers"] == [2, 3]
    chat, code = entry["categories"]["chat"], entry["categories"]["code"]
    assert chat["speedup"] == pytest.approx(2.0) and chat["speedup_covers"] == [1, 2]
    assert code["speedup"] == pytest.approx(4.0) and code["speedup_covers"] == [1, 1]


def test_no_prompt_alike_no_figure():
    pld = [record(1, "pld", 1.0, [9] * 20)]
    entry = summary(pld, Run("pld", "pld", "llamacpp"))
    assert entry["speedup"] is None and entry["speedup_covers"] == [0, 1]
    assert entry["decode_speedup"] is None and entry["decode_speedup_covers"] == [0, 1]


def test_a_failed_run_is_counted_among_the_prompts_but_not_covered():
    pld = [record(1, "pld", 1.0, [5] * 20), RunRecord(2, "chat", "pld", "llamacpp", error="boom")]
    entry = summary(pld, Run("pld", "pld", "llamacpp"))
    assert entry["speedup"] == pytest.approx(2.0) and entry["speedup_covers"] == [1, 2]


def test_an_anchor_that_writes_fewer_tokens_is_compared_per_token():
    # The review's case: the anchor stopped after 56 tokens where ar wrote 87, at the same time per token.
    ar = [record(1, "ar", 8.7, [5] * 87)]
    anchor = [record(1, "llamacpp_generate", 5.6, [5] * 41 + [8] * 15)]
    by = {r.question_id: r for r in ar}
    entry = summarise_method(Run("llamacpp_generate", "llamacpp_generate", "llamacpp"), anchor,
                             References(by, by, "ar"), primary="llamacpp", exact_checked=True, oracle=None,
                             categories=["chat"])
    assert entry["speedup_basis"] == PER_TOKEN
    assert entry["speedup"] == pytest.approx(1.0) and entry["speedup_covers"] == [1, 1]  # not 8.7 / 5.6


def test_samples_are_compared_per_token():
    pld = [record(1, "pld", 1.0, [5] * 10), record(2, "pld", 1.5, [1] * 30), record(3, "pld", 1.0, [2] * 20,
                                                                                    category="code")]
    entry = summary(pld, Run("pld", "pld", "llamacpp"), greedy=False)
    assert entry["speedup_basis"] == PER_TOKEN
    # per token: (2.0/20)/(1.0/10) = 1, (3.0/30)/(1.5/30) = 2, (1.0/10)/(1.0/20) = 2
    assert entry["speedup"] == pytest.approx(2.0) and entry["speedup_covers"] == [3, 3]


def test_another_backends_method_is_per_token_against_the_primary_and_exact_against_its_own():
    own = [record(1, "ar@transformers", 4.0, [3] * 20, backend="transformers")]
    mine = [record(1, "pld@transformers", 2.0, [3] * 20, backend="transformers")]
    entry = summary(mine, Run("pld@transformers", "pld", "transformers"), own=own)
    assert (entry["speedup_basis"], entry["speedup_own_basis"]) == (PER_TOKEN, SAME_TOKENS)
    assert entry["speedup"] == pytest.approx(1.0)  # primary ar: 2.0 s for 20 of its tokens, like this run
    assert entry["speedup_own"] == pytest.approx(2.0) and entry["speedup_own_covers"] == [1, 1]


def cells(markdown_table: str, row: int) -> dict[str, str]:
    lines = markdown_table.splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return dict(zip(header, (cell.strip() for cell in lines[row].strip("|").split("|")), strict=True))


def test_the_report_says_what_each_figure_covers():
    pld = [record(1, "pld", 1.0, [5] * 20), record(2, "pld", 0.5, [6] * 12),
           record(3, "pld", 0.25, [7] * 10, category="code")]
    anchor = [record(q, "llamacpp_generate", r.wall_s / 2, [8] * r.new_tokens, category=r.category)
              for q, r in zip((1, 2, 3), AR, strict=True)]
    results = {"categories": ["chat", "code"], "constrained": [], "backend": "llamacpp",
               "methods": {"ar": summary(AR, Run("ar", "ar", "llamacpp")),
                           "pld": summary(pld, Run("pld", "pld", "llamacpp")) | {"oracle": 2.5},
                           "llamacpp_generate": summary(anchor, Run("llamacpp_generate", "llamacpp_generate",
                                                                    "llamacpp"))}}
    ar, pld_row, anchor_row = cells(table(results), 2), cells(table(results), 3), cells(table(results), 4)
    assert ar["overall"] == "1.00x (3/3)" and ar["chat"] == "1.00x (2/2)"
    assert pld_row["overall"] == "3.00x (2/3)" and pld_row["chat"] == "2.00x (1/2)" and pld_row["code"] == \
        "4.00x (1/1)"
    assert pld_row["decode speedup"].endswith("x (2/3)")
    assert anchor_row["overall"] == "2.00x/tok (3/3)" and anchor_row["vs own ar"] == "2.00x/tok (3/3)"
    assert cells(decode_table(results), 3)["overall"].endswith("x (2/3)")
    assert cells(oracle_table(results), 2)["overall"] == "3.00x (2/3) / 2.50x"
    missing = summary([record(1, "pld", 1.0, [9] * 20)], Run("pld", "pld", "llamacpp"))
    row = cells(table({**results, "methods": {"pld": missing}}), 2)
    assert row["overall"] == "n/a (0/1)" and row["chat"] == "n/a (0/1)" and row["code"] == "n/a (0/0)"
