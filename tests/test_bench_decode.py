"""hasten bench's decode speed (prefill left out): the arithmetic on records with known times, missing prefill
timings shown as missing, and the report's tables and records.csv."""

from __future__ import annotations

import csv
import time

import pytest
import torch
from conftest import tiny_loaded

from hasten.backends.transformers.generate import first_pass_timer
from hasten.bench.anchors import run_hf_anchor
from hasten.bench.records import Run, RunRecord, decode_fields, decode_ms_per_token, decode_s, decode_tokens
from hasten.bench.report import decode_table, table, write_records_csv
from hasten.bench.summary import References, summarise_method
from hasten.sampling import SamplingParams


def record(question: int, method: str, wall: float, prefill: float | None, turns: list[int],
           category: str = "chat") -> RunRecord:
    """A record with ``turns`` new tokens per turn, timed as given."""
    ids = [[7] * n for n in turns]
    return RunRecord(question, category, method, "llamacpp", wall_s=wall, new_tokens=sum(turns), target_passes=
                     sum(turns), prefill_s=prefill, token_ids=ids, draft_s=None if prefill is None else 0.0)


def test_decode_ms_per_token_leaves_out_the_prefill_and_each_turns_first_token():
    one = record(1, "ar", wall=1.0, prefill=0.2, turns=[9])
    assert decode_tokens(one) == 8
    assert decode_s(one) == pytest.approx(0.8)
    assert decode_ms_per_token(one) == pytest.approx(100.0)  # (1.0 - 0.2) s / (9 - 1) tokens
    two = record(2, "ar", wall=0.9, prefill=0.3, turns=[4, 4])  # each turn's first token comes from its prefill
    assert decode_tokens(two) == 6 and decode_ms_per_token(two) == pytest.approx(100.0)
    assert decode_fields(two) == {"decode_tokens": 6, "decode_s": pytest.approx(0.6),
                                  "decode_ms_per_token": pytest.approx(100.0)}


def test_no_decode_figure_without_a_prefill_a_second_token_or_on_an_error():
    assert decode_s(record(1, "hf", 1.0, None, [9])) is None
    assert decode_ms_per_token(record(1, "hf", 1.0, None, [9])) is None
    assert decode_ms_per_token(record(1, "ar", 1.0, 0.2, [1])) is None  # only the prefill's token
    failed = RunRecord(1, "chat", "ar", error="too long", prefill_s=0.0)
    assert decode_s(failed) is None and decode_ms_per_token(failed) is None


def summary(records: list[RunRecord], baseline: list[RunRecord], label: str = "pld") -> dict:
    by_question = {r.question_id: r for r in baseline}
    return summarise_method(Run(label, label, "llamacpp"), records, References(by_question, by_question, "ar"),
                            primary="llamacpp", exact_checked=False, oracle=None, categories=["chat", "code"])


AR = [record(1, "ar", wall=2.0, prefill=0.4, turns=[9], category="chat"),  # 200 ms/token after the first
      record(2, "ar", wall=1.2, prefill=0.4, turns=[9], category="code")]  # 100 ms/token


def test_decode_speedup_is_the_median_of_per_prompt_ratios():
    pld = [record(1, "pld", wall=1.2, prefill=0.4, turns=[9], category="chat"),  # 100 ms/token: 2x
           record(2, "pld", wall=0.6, prefill=0.4, turns=[9], category="code")]  # 25 ms/token: 4x
    entry = summary(pld, AR)
    assert entry["speedup"] == pytest.approx((2.0 / 1.2 + 1.2 / 0.6) / 2)  # prefill included, unchanged
    assert entry["decode_speedup"] == pytest.approx(3.0) and entry["decode_speedup_own"] == pytest.approx(3.0)
    assert entry["decode_ms_per_token"] == pytest.approx(62.5)  # median of 100 and 25
    assert entry["prefill_ms"] == pytest.approx(400.0)
    assert entry["categories"]["chat"]["decode_speedup"] == pytest.approx(2.0)
    assert entry["categories"]["code"]["decode_speedup"] == pytest.approx(4.0)
    assert entry["categories"]["code"]["decode_ms_per_token"] == pytest.approx(25.0)
    assert summary(AR, AR, "ar")["decode_speedup"] == 1.0


def test_a_method_without_prefill_timing_shows_missing_not_zero(tmp_path):
    anchor = [record(1, "anchor", wall=1.0, prefill=None, turns=[9], category="chat"),
              record(2, "anchor", wall=1.0, prefill=None, turns=[9], category="code")]
    entry = summary(anchor, AR, "anchor")
    assert entry["speedup"] is not None  # the prefill-included figures stay
    for key in ("prefill_ms", "decode_ms_per_token", "decode_speedup", "decode_speedup_own"):
        assert entry[key] is None, key
    assert entry["categories"]["chat"]["decode_speedup"] is None
    results = {"categories": ["chat", "code"], "constrained": [], "backend": "llamacpp",
               "methods": {"ar": summary(AR, AR, "ar"), "anchor": entry},
               "records": [r.__dict__ | decode_fields(r) for r in [*AR, *anchor]]}
    leaderboard = table(results).splitlines()
    header = [cell.strip() for cell in leaderboard[0].strip("|").split("|")]
    row = dict(zip(header, (cell.strip() for cell in leaderboard[3].strip("|").split("|")), strict=True))
    assert row["method"] == "anchor" and row["decode ms/token"] == "—" and row["decode speedup"] == "—"
    # the wall speedup is still there (per token: these are samples): median of 2.0/1.0 and 1.2/1.0
    assert row["overall"] == "1.60x/tok (2/2)"
    decode = decode_table(results).splitlines()
    same = "1.00x/tok (1/1) | 1.00x/tok (1/1) | 1.00x/tok (2/2) | 1.00x/tok (2/2)"
    assert decode[2] == f"| ar | {same} | 400.0 | 150.00 |"
    assert decode[3] == "| anchor | — | — | — | — | — | — |"
    path = tmp_path / "records.csv"
    write_records_csv(results, path)
    rows = list(csv.DictReader(path.open(encoding="utf-8")))
    assert [row["method"] for row in rows] == ["ar", "ar", "anchor", "anchor"]
    assert float(rows[0]["decode_ms_per_token"]) == pytest.approx(200.0) and float(rows[0]["prefill_s"]) == 0.4
    assert rows[2]["prefill_s"] == "" and rows[2]["decode_ms_per_token"] == "" and rows[2]["decode_s"] == ""
    assert rows[2]["decode_tokens"] == "8" and rows[2]["wall_s"] == "1.0"


class Slow(torch.nn.Module):
    """A module whose calls take ``seconds[i]`` each."""

    def __init__(self, seconds: list[float]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds.pop(0))
        return x


def test_the_first_pass_timer_times_the_first_call_only_and_unhooks():
    model = Slow([0.05, 0.0, 0.0])
    with first_pass_timer(model, time.perf_counter) as timed:
        model(torch.zeros(1))
        assert not model._forward_hooks and not model._forward_pre_hooks  # gone after the first call
        model(torch.zeros(1))
    assert len(timed) == 1 and 0.05 <= timed[0] < 0.5
    with first_pass_timer(model, time.perf_counter) as timed:  # no call: nothing measured, and no hook left behind
        pass
    assert timed == [] and not model._forward_hooks and not model._forward_pre_hooks


@pytest.mark.parametrize("name", ["hf_generate", "hf_pld", "hf_static"])
def test_transformers_anchors_time_their_prefill(name):
    loaded = tiny_loaded(seed=4)
    out = run_hf_anchor(name, loaded, [5, 6, 7, 8, 9, 5, 6, 7, 8], 6, SamplingParams())
    assert len(out.token_ids) == 6 and out.prefill_s is not None and out.prefill_s > 0
    assert not loaded.model._forward_hooks and not loaded.model._forward_pre_hooks
