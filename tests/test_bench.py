"""hasten bench: the prompt reader, the runner's results on tiny models, the report files and the CLI's errors."""

from __future__ import annotations

import csv
import functools
import json
import tempfile

import pytest
from conftest import greedy_reference, tiny_loaded, tiny_tokenizer

import hasten.bench.runner as runner
from hasten.adaptive import adaptive_state
from hasten.adaptive.cost import CostModel
from hasten.bench import BenchPrompt, balanced_subset, read_prompts, run_bench, shipped_prompts_path, write_report
from hasten.bench.oracle import LlamaCppPldSource, LookaheadPoolSource, OracleRun, PldSource, accepted_prefix, replay
from hasten.bench.runner import conversation_ids, rotated, run_question
from hasten.cli import main
from hasten.errors import HastenError
from hasten.models import LoadedModel, load_model
from hasten.sampling import SamplingParams

# ---------------------------------------------------------------- prompt reader


def write_lines(tmp_path, *lines: str):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_reads_spec_bench_format_with_multi_turn(tmp_path):
    path = write_lines(
        tmp_path,
        json.dumps({"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Make it rhyme."],
                    "reference": []}),
        "",
        json.dumps({"question_id": "q2", "category": "math", "turns": ["1 + 1?"]}),
    )
    prompts = read_prompts(path)
    assert prompts == [BenchPrompt(81, "writing", ("Write a poem.", "Make it rhyme.")),
                       BenchPrompt("q2", "math", ("1 + 1?",))]


def test_reads_simple_form_with_line_number_ids(tmp_path):
    path = write_lines(
        tmp_path,
        json.dumps({"prompt": "Say hi.", "category": "chat"}),
        json.dumps({"prompt": "No category."}),
        json.dumps({"id": "mbpp/1", "prompt": "Write code.", "category": "code"}),
    )
    prompts = read_prompts(path)
    assert prompts == [BenchPrompt(1, "chat", ("Say hi.",)), BenchPrompt(2, "general", ("No category.",)),
                       BenchPrompt("mbpp/1", "code", ("Write code.",))]


GOOD = json.dumps({"question_id": 1, "category": "chat", "turns": ["Hello"]})


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"category": "chat"}), "missing 'turns'"),
        (json.dumps({"category": "chat", "turns": ["x"]}), "missing 'question_id'"),
        (json.dumps({"question_id": 2, "turns": []}), "non-empty list"),
        (json.dumps({"question_id": 2, "turns": "Hello"}), "non-empty list"),
        (json.dumps({"question_id": 2, "turns": ["ok", 3]}), "non-empty string"),
        (json.dumps({"question_id": 2, "turns": ["ok", "  "]}), "non-empty string"),
        (json.dumps({"prompt": 5}), "non-empty string"),
        (json.dumps({"question_id": 2.5, "turns": ["x"]}), "'question_id' must be"),
        (json.dumps({"question_id": True, "turns": ["x"]}), "'question_id' must be"),
        (json.dumps({"question_id": 2, "category": 7, "turns": ["x"]}), "'category' must be"),
        (json.dumps({"question_id": 2, "turns": ["x"], "prompt": "y"}), "not both"),
        (json.dumps({"question_id": 1, "turns": ["again"]}), "already used on line 1"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, bad, message):
    path = write_lines(tmp_path, GOOD, "", bad)
    with pytest.raises(HastenError) as error:
        read_prompts(path)
    text = str(error.value)
    assert f"{path}, line 3:" in text
    assert message in text
    assert "\n" not in text


def test_empty_or_missing_file_is_an_error(tmp_path):
    with pytest.raises(HastenError, match="holds no prompts"):
        read_prompts(write_lines(tmp_path, "", "  "))
    with pytest.raises(HastenError, match="cannot read prompt file"):
        read_prompts(tmp_path / "absent.jsonl")


def test_shipped_prompt_set():
    assert shipped_prompts_path().is_file()
    prompts = read_prompts()
    assert len(prompts) == 52
    categories = {p.category for p in prompts}
    assert categories == {"chat", "code", "summarization", "math", "translation", "rag", "qa", "structured"}
    assert sum(len(p.turns) > 1 for p in prompts) >= 3
    assert {p.category for p in prompts if p.response_format is not None} == {"structured"}


def test_balanced_subset_covers_categories_in_file_order():
    prompts = [BenchPrompt(i, "ab"[i >= 4], (f"p{i}",)) for i in range(8)]
    assert [p.question_id for p in balanced_subset(prompts, 3)] == [0, 1, 4]
    assert balanced_subset(prompts, None) == prompts
    assert balanced_subset(prompts, 100) == prompts
    with pytest.raises(HastenError):
        balanced_subset(prompts, 0)


def test_rotation_gives_every_method_every_slot():
    methods = ["ar", "pld", "hf_generate"]
    orders = [rotated(methods, i) for i in range(3)]
    assert all(sorted(order) == sorted(methods) for order in orders)
    assert {order[0] for order in orders} == set(methods)


# ---------------------------------------------------------------- runner on tiny models

PROMPTS = [
    BenchPrompt(1, "copy", ("w5 w6 w7 w8 w9 w5 w6 w7 w8 w9 w5 w6",)),
    BenchPrompt("two-turn", "chat", ("w10 w11 w12 w13 w10 w11", "w20 w21 w22")),
    BenchPrompt(3, "copy", ("w30 w31 w32 w30 w31 w32 w30",)),
]
ALL = ["ar", "pld", "draft", "hf_generate", "hf_pld", "hf_assisted"]


@pytest.fixture(scope="module")
def bench_results():
    loaded, draft = tiny_loaded(seed=0), tiny_loaded(seed=1)
    # A flat cost curve (wide passes as cheap as one token, as on a GPU) and a slow one (a second a pass): adaptive
    # drafting always drafts what it has, and the draft's own measured time (milliseconds on the tiny model, more
    # on a loaded machine) never closes its gate during its trials.
    adaptive_state(loaded).cost = CostModel([1, 64], [1000.0, 1000.0])
    return run_bench(loaded, PROMPTS, [*ALL, "no_such_method"], draft=draft, max_new_tokens=8, warmup=1,
                     progress=False)


def test_results_schema(bench_results):
    res = bench_results
    assert res["model"] == "tiny-llama-0" and res["max_new_tokens"] == 8 and res["prompts"] == 3
    assert list(res["methods"]) == ALL
    for method, entry in res["methods"].items():
        assert isinstance(entry["tokens_per_s"], float) and entry["tokens_per_s"] > 0, method
        assert isinstance(entry["speedup"], float) and entry["speedup"] > 0, method
        assert isinstance(entry["mean_accepted"], float) and entry["mean_accepted"] >= 1.0, method
        assert isinstance(entry["target_passes"], int) and entry["target_passes"] > 0, method
        assert isinstance(entry["wall_s"], float) and entry["wall_s"] > 0, method
        assert entry["exact"] is True, (method, entry["mismatches"])
        assert entry["mismatches"] == [] and entry["errors"] == []
        assert set(entry["categories"]) == {"copy", "chat"}
        for part in entry["categories"].values():
            figures = {"speedup", "speedup_own", "decode_speedup", "decode_speedup_own"}
            assert set(part) == {"mean_accepted", "tokens_per_s", "oracle", "decode_ms_per_token", *figures,
                                 *(f"{key}_covers" for key in figures)}
            assert part["speedup_covers"][0] == part["speedup_covers"][1] > 0  # every output exact: all covered
            assert part["decode_ms_per_token"] > 0 and part["decode_speedup"] > 0, method
            assert part["speedup"] > 0 and part["mean_accepted"] >= 1.0 and part["tokens_per_s"] > 0
            assert part["speedup_own"] == part["speedup"]  # one backend: its ar is the primary ar
        assert entry["backend"] == "transformers" and entry["baseline"] == "ar"
        assert entry["speedup_own"] == entry["speedup"]
        # every row's prefill is timed (the anchors' too), so every row has a decode speed
        assert entry["prefill_ms"] > 0 and entry["decode_ms_per_token"] > 0, method
        assert entry["decode_speedup"] > 0 and entry["decode_speedup_own"] == entry["decode_speedup"], method
        if method.startswith("hf_"):
            assert entry["draft_ms_per_step"] is None and entry["mean_drafted"] is None, method
        else:  # the proposer ran, timed, at every step; every method but ar drafted tokens
            assert entry["draft_ms_per_step"] > 0, method
            assert (entry["mean_drafted"] > 0) is (method != "ar"), method
    assert res["methods"]["ar"]["speedup"] == 1.0 and res["methods"]["ar"]["decode_speedup"] == 1.0
    assert res["methods"]["ar"]["mean_accepted"] == 1.0
    for r in res["records"]:  # (wall - prefill) / (new tokens - turns), the prefill inside the timed call
        assert 0 < r["prefill_s"] < r["wall_s"], r["method"]
        assert r["decode_tokens"] == r["new_tokens"] - len(r["token_ids"])
        assert r["decode_ms_per_token"] == pytest.approx(1000 * (r["wall_s"] - r["prefill_s"]) / r["decode_tokens"])
    assert res["methods"]["ar"]["mean_drafted"] == 0.0 and res["methods"]["ar"]["plain_steps"] == 1.0
    pld = res["methods"]["pld"]
    assert 0.0 <= pld["plain_steps"] <= 1.0 and pld["mean_drafted"] > 0 and "mean_drafted" in pld["method_stats"]
    assert pld["oracle"] > 0 and pld["oracle_mean_accepted"] >= 1.0
    assert all(part["oracle"] > 0 for part in pld["categories"].values())
    assert res["methods"]["ar"]["oracle"] is None and res["methods"]["hf_pld"]["oracle"] is None
    cost = res["backends"]["transformers"]["cost"]
    assert cost["widths"][0] == 1 and len(cost["widths"]) == len(cost["millis"]) == len(cost["millis_end"])
    assert cost["relative"][0] == 1.0 and all(m > 0 for m in cost["millis"])
    assert res["backend"] == "transformers" and res["machine"]["backends"] == ["transformers"]
    assert res["methods"]["hf_generate"]["mean_accepted"] == 1.0  # one token per forward call
    tokens = res["methods"]["ar"]["new_tokens"]
    assert all(entry["new_tokens"] == tokens for entry in res["methods"].values())
    assert res["methods"]["pld"]["target_passes"] < res["methods"]["ar"]["target_passes"]  # the copies get drafted
    assert len(res["records"]) == len(ALL) * len(PROMPTS)
    assert all(len(r["token_ids"]) == len(p.turns) for r in res["records"] for p in PROMPTS
               if r["question_id"] == p.question_id)


def test_unknown_method_is_skipped_with_a_warning(bench_results):
    assert "no_such_method" in bench_results["skipped"]
    assert any("no_such_method" in warning for warning in bench_results["warnings"])


def test_methods_that_cannot_be_built_are_skipped():
    res = run_bench(tiny_loaded(), PROMPTS[:1], ["pld", "draft", "hf_assisted"], max_new_tokens=3, warmup=0,
                    progress=False)
    assert list(res["methods"]) == ["ar", "pld"]  # ar is added as the baseline
    assert "draft model" in res["skipped"]["draft"] and "draft model" in res["skipped"]["hf_assisted"]
    assert any("added ar" in warning for warning in res["warnings"])


def test_report_files(bench_results, tmp_path):
    out = write_report(bench_results, tmp_path / "out", command="hasten bench --limit 3")
    saved = json.loads((out / "results.json").read_text())
    assert saved["methods"]["pld"]["speedup"] == bench_results["methods"]["pld"]["speedup"]
    assert saved["command"] == "hasten bench --limit 3"
    report = (out / "report.md").read_text()
    assert ("| method | copy | chat | overall | vs own ar | oracle | tokens/pass | tokens/s | decode ms/token | "
            "decode speedup | draft ms/step | drafted/step | plain steps | exact |") in report
    decode = report.split("## Decode speed")[1]
    assert "| method | copy | chat | overall | vs own ar | prefill ms | decode ms/token |" in decode
    assert "| ar | 1.00x (2/2) | " in decode and "| — |" not in decode  # every row's prefill was measured
    with (out / "records.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(saved["records"])
    for row, saved_record in zip(rows, saved["records"], strict=True):
        assert row["method"] == saved_record["method"]
        assert float(row["decode_ms_per_token"]) == pytest.approx(saved_record["decode_ms_per_token"])
    for method in ALL:
        assert f"| {method} |" in report
    assert "no_such_method" in report
    assert "## Oracle bound per category" in report and "| pld | " in report.split("## Oracle bound")[1]
    assert "## Cost curve" in report
    assert "| tokens scored | transformers ms | transformers x one token | transformers ms at the end |" in report
    for image in ("speedup.png", "cost_curve.png"):
        assert (out / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ar_records = [r for r in saved["records"] if r["method"] == "ar"]
    assert ar_records and all(r["prompt_ids"] for r in ar_records)  # kept for offline replays
    assert all(r["prompt_ids"] is None for r in saved["records"] if r["method"] != "ar")


def test_later_turns_see_the_methods_own_answer():
    loaded = tiny_loaded(seed=2)
    prompt = PROMPTS[1]
    record = run_question("pld", loaded, prompt, 8, SamplingParams(), {}, None)
    first = conversation_ids(loaded, [{"role": "user", "content": prompt.turns[0]}])
    assert record.token_ids[0] == greedy_reference(loaded.model, first, 8)
    answer = loaded.tokenizer.decode(record.token_ids[0], skip_special_tokens=True)
    second = conversation_ids(loaded, [{"role": "user", "content": prompt.turns[0]},
                                       {"role": "assistant", "content": answer},
                                       {"role": "user", "content": prompt.turns[1]}])
    assert len(second) > len(first) + 1
    assert record.token_ids[1] == greedy_reference(loaded.model, second, 8)
    assert record.new_tokens == sum(map(len, record.token_ids))


def test_a_different_output_is_reported_as_a_mismatch(monkeypatch):
    real = runner.generate

    def corrupt(loaded, ids, method, **kwargs):
        result = real(loaded, ids, method, **kwargs)
        if method == "pld" and ids[0] == 30:
            result.token_ids = [*result.token_ids[:-1], (result.token_ids[-1] + 1) % 64]
        return result

    monkeypatch.setattr(runner, "generate", corrupt)
    res = run_bench(tiny_loaded(), [PROMPTS[0], PROMPTS[2]], ["ar", "pld"], max_new_tokens=4, warmup=0,
                    progress=False)
    assert res["methods"]["pld"]["exact"] is False
    assert res["methods"]["pld"]["mismatches"] == [3]
    assert res["methods"]["ar"]["exact"] is True
    assert res["methods"]["pld"]["speedup_covers"] == [1, 2]  # timed on the prompt it got right only


def test_sampling_does_not_claim_exactness():
    res = run_bench(tiny_loaded(), PROMPTS[:1], ["ar", "pld", "hf_generate"], max_new_tokens=4, warmup=0,
                    temperature=1.0, progress=False)
    assert all(entry["exact"] is None for entry in res["methods"].values())
    assert all(entry["speedup_basis"] == "per token" for entry in res["methods"].values())
    assert res["exactness_checked"] is False
    assert any("not checked" in warning for warning in res["warnings"])


def test_bad_arguments():
    with pytest.raises(HastenError, match="max_new_tokens"):
        run_bench(tiny_loaded(), PROMPTS, ["ar"], max_new_tokens=0, progress=False)
    with pytest.raises(HastenError, match="no prompts"):
        run_bench(tiny_loaded(), [], ["ar"], progress=False)


# ---------------------------------------------------------------- oracle replay

# A synthetic cost curve: 10 ms for one token, 4 ms per extra token (linear between the measured widths).
COST = CostModel([1, 2, 4, 8], [10.0, 14.0, 22.0, 38.0])


def test_accepted_prefix():
    assert accepted_prefix([3, 4, 9], [3, 4, 5]) == 2
    assert accepted_prefix([7], [3]) == 0
    assert accepted_prefix([3, 4], [3, 4, 5]) == 2
    assert accepted_prefix([], [1]) == 0


def test_oracle_pld_by_hand():
    # The prefill gives 2 (not counted). Step 1: the tail [1, 2] matched at 0 proposes [3, 4, 9]; 2 accepted ->
    # emits 3, 4, 5 for cost(3) = 18. Step 2: one token left, nothing to draft -> emits 6 for cost(1) = 10.
    # ar: 4 tokens after the prefill's x 10 ms.
    run = replay([1, 2, 3, 4, 9, 1], [2, 3, 4, 5, 6], PldSource(), COST)
    assert (run.tokens, run.steps, run.oracle_ms, run.ar_ms) == (4, 2, 28.0, 40.0)
    assert run.speedup == pytest.approx(40 / 28) and run.mean_accepted == 2.0


def test_oracle_takes_the_best_branch_and_caps_the_depth():
    # After the prefill's 5, the tail [5] matched at 3 proposes [7, 7, 5], at 0 [6, 6, 5]: the second is all
    # accepted (3 = the depth cap: 4 tokens to come, the target adds one) -> one step, cost(4) = 22.
    prompt, output = [5, 6, 6, 5, 7, 7], [5, 6, 6, 5, 8]
    run = replay(prompt, output, PldSource(), COST)
    assert (run.steps, run.oracle_ms) == (1, 22.0)
    # With one branch only [7, 7, 5] is offered: step 1 emits 6 (cost 10); then the tail [5, 6] matched at 0
    # proposes [6, 5], both accepted -> 6, 5, 8 for cost(3) = 18.
    single = replay(prompt, output, PldSource(branches=1), COST)
    assert (single.steps, single.oracle_ms, single.speedup) == (2, 28.0, pytest.approx(40 / 28))


def test_oracle_lookahead_pool_by_hand():
    # Pool of 3-grams, 2 tails per key, from the context only (the prompt and the prefill's 1). Key 1 holds
    # [2, 4], [2, 3] (most recent first).
    # Step 1: [2, 3] accepted -> emits 2, 3, 9 (cost 18); the pool gains (2, 3, 9), which evicts (2, 3, 1).
    # Step 2: nothing under 9 -> emits 2 (cost 10). Step 3: under 2, [3, 9] and [4, 1], cut to the 1 token
    # left to draft: [3] accepted -> emits 3, 9 (cost 14). ar: 6 x 10 ms.
    run = replay([1, 2, 3, 1, 2, 4], [1, 2, 3, 9, 2, 3, 9], LookaheadPoolSource(ngram=3, guesses=2), COST)
    assert (run.tokens, run.steps, run.oracle_ms, run.ar_ms) == (6, 3, 42.0, 60.0)


class Recording:
    """A candidate source that records what it is given and proposes nothing."""

    def __init__(self) -> None:
        self.started: list[int] = []
        self.asked: list[tuple[list[int], int]] = []

    def start(self, context: list[int]) -> None:
        self.started = list(context)

    def candidates(self, context: list[int], depth: int) -> list[list[int]]:
        self.asked.append((list(context), depth))
        return []

    def advance(self, context: list[int], new: list[int]) -> None:
        pass


def test_oracle_starts_after_the_prefills_token():
    # The engine gets the first token from the prefill and drafts only after it: the replay starts there, and
    # neither cost counts that token.
    source = Recording()
    run = replay([1, 2, 3, 4, 9, 1, 2], [3, 4, 5, 6], source, COST)
    assert source.started == [1, 2, 3, 4, 9, 1, 2, 3]
    assert source.asked[0] == ([1, 2, 3, 4, 9, 1, 2, 3], 2)  # 3 tokens to come, the target adds one
    assert (run.tokens, run.steps, run.oracle_ms, run.ar_ms) == (3, 3, 30.0, 30.0)
    # The pld candidates on the same answer: the tail [1, 2, 3] proposes [4, 9], 1 accepted -> 4, 5 for
    # cost(2) = 14, then 6 for cost(1) = 10.
    pld = replay([1, 2, 3, 4, 9, 1, 2], [3, 4, 5, 6], PldSource(), COST)
    assert (pld.tokens, pld.steps, pld.oracle_ms, pld.ar_ms) == (3, 2, 24.0, 30.0)
    lone = replay([1, 2], [3], Recording(), COST)  # the prefill's token only: nothing to replay
    assert (lone.tokens, lone.steps, lone.oracle_ms, lone.speedup) == (0, 0, 0.0, None)
    assert replay([1, 2], [], Recording(), COST) == OracleRun()


def test_oracle_llamacpp_pld_candidate():
    pytest.importorskip("llama_cpp")
    assert LlamaCppPldSource().candidates([1, 2, 3, 1, 2], 2) == [[3, 1]]  # the first match of [1, 2]
    assert LlamaCppPldSource().candidates([1, 2, 3], 4) == []


def test_oracle_runs_add_up():
    total = OracleRun(3, 2, 28.0, 40.0) + OracleRun(1, 1, 10.0, 10.0)
    assert (total.tokens, total.steps, total.speedup) == (4, 3, 50 / 38)
    assert OracleRun().speedup is None and OracleRun().mean_accepted is None


# ---------------------------------------------------------------- several backends (a tiny GGUF)

GGUF_VOCAB = 96


@functools.cache
def tiny_gguf_models() -> dict[str, LoadedModel]:
    """One tiny random GGUF on llama.cpp (primary) and on transformers, with a word-level tokenizer."""
    pytest.importorskip("llama_cpp")
    from tiny_gguf import write_tiny_gguf

    path = write_tiny_gguf(f"{tempfile.mkdtemp(prefix='hasten-bench-')}/tiny.gguf", vocab_size=GGUF_VOCAB)
    models = {}
    for backend in ("llamacpp", "transformers"):
        loaded = load_model(str(path), backend, threads=1)
        models[backend] = LoadedModel("tiny-gguf", loaded.backend, tiny_tokenizer(GGUF_VOCAB), loaded.path)
    return models


GGUF_PROMPTS = [
    BenchPrompt(1, "copy", ("w5 w6 w7 w8 w9 w5 w6 w7 w8 w9 w5 w6",)),
    BenchPrompt(2, "chat", ("w10 w11 w12 w13 w10 w11", "w20 w21 w22")),
]
BOTH = ["ar", "pld", "lookahead", "llamacpp_generate", "llamacpp_pld", "hf_generate"]


@pytest.fixture(scope="module")
def two_backends():
    return run_bench(tiny_gguf_models(), GGUF_PROMPTS, BOTH, max_new_tokens=12, warmup=1, progress=False)


def test_every_method_runs_on_every_backend(two_backends):
    res = two_backends
    assert list(res["methods"]) == ["ar", "pld", "lookahead", "llamacpp_generate", "llamacpp_pld",
                                    "ar@transformers", "pld@transformers", "lookahead@transformers", "hf_generate"]
    assert res["backend"] == "llamacpp" and list(res["backends"]) == ["llamacpp", "transformers"]
    for label, entry in res["methods"].items():
        own = "transformers" if "@" in label or label.startswith("hf_") else "llamacpp"
        assert entry["backend"] == own and entry["baseline"] == ("ar" if own == "llamacpp" else "ar@transformers")
        assert entry["errors"] == [], label
        if label != "llamacpp_pld":  # another library's drafting may legitimately differ: reported, not asserted
            assert entry["exact"] is True, (label, entry["mismatches"])
    assert res["methods"]["ar"]["speedup"] == 1.0 and res["methods"]["ar@transformers"]["speedup_own"] == 1.0
    assert res["methods"]["ar@transformers"]["same_as_primary_ar"] is not None
    for backend, info in res["backends"].items():
        assert info["threads"] == 1, backend
        assert info["cost"]["widths"][0] == 1 and info["cost"]["millis"][0] > 0
    assert res["machine"]["llamacpp_threads"] == 1
    for label in ("pld", "lookahead", "llamacpp_pld", "pld@transformers", "lookahead@transformers"):
        assert res["methods"][label]["oracle"] > 0, label
    anchor = res["methods"]["llamacpp_generate"]
    assert anchor["mean_accepted"] == 1.0 and anchor["draft_ms_per_step"] is None  # one eval per token
    assert anchor["new_tokens"] == res["methods"]["ar"]["new_tokens"]
    for r in res["records"]:  # llama-cpp-python's prefill too: its first eval to its first sampled token
        assert 0 < r["prefill_s"] < r["wall_s"] and r["decode_ms_per_token"] > 0, r["method"]
    assert all(entry["decode_speedup_own"] > 0 for entry in res["methods"].values())


def test_exactness_is_against_the_own_backend(monkeypatch):
    real = runner.generate

    def shifted(loaded, ids, method, **kwargs):  # the transformers backend "decodes differently", consistently
        result = real(loaded, ids, method, **kwargs)
        if loaded.backend.backend == "transformers":
            result.token_ids = [(token + 1) % GGUF_VOCAB for token in result.token_ids]
        return result

    monkeypatch.setattr(runner, "generate", shifted)
    res = run_bench(tiny_gguf_models(), GGUF_PROMPTS[:1], ["ar", "pld"], max_new_tokens=6, warmup=0,
                    progress=False)
    assert res["methods"]["pld@transformers"]["exact"] is True
    assert res["methods"]["ar@transformers"]["same_as_primary_ar"] == 0.0
    assert res["methods"]["ar@transformers"]["speedup_own"] == 1.0
    report = write_report(res, tempfile.mkdtemp()) / "report.md"
    assert "ar@transformers gives the same tokens as llamacpp ar on 0% of the questions" in report.read_text()


def test_one_backend_only_and_anchors_without_their_backend():
    models = tiny_gguf_models()
    res = run_bench(models, GGUF_PROMPTS[:1], ["pld@transformers", "pld@nowhere", "hf_pld@llamacpp"],
                    max_new_tokens=4, warmup=0, progress=False)
    assert list(res["methods"]) == ["ar", "ar@transformers", "pld@transformers"]
    assert "not loaded" in res["skipped"]["pld@nowhere"]
    assert "transformers backend only" in res["skipped"]["hf_pld@llamacpp"]
    alone = run_bench({"llamacpp": models["llamacpp"]}, GGUF_PROMPTS[:1], ["hf_generate"], max_new_tokens=4,
                      warmup=0, progress=False)
    assert "--compare-backend transformers" in alone["skipped"]["hf_generate"]
    hf = run_bench(tiny_loaded(), PROMPTS[:1], ["llamacpp_generate"], max_new_tokens=4, warmup=0, progress=False)
    assert "llamacpp backend: a .gguf model" in hf["skipped"]["llamacpp_generate"]


def test_llamacpp_anchor_uses_the_backends_threads_and_stops_at_the_end_token():
    from hasten.bench.anchors import LlamaCppAnchor

    loaded = tiny_gguf_models()["llamacpp"]
    anchor = LlamaCppAnchor("llamacpp_generate", loaded)
    try:
        assert anchor.threads == loaded.backend.threads == 1 and anchor.llama.n_threads == 1
        assert anchor.llama.n_ctx() == loaded.max_context
        ids = conversation_ids(loaded, [{"role": "user", "content": "w5 w6 w7 w8 w9 w5 w6"}])
        reference = runner.generate(loaded, ids, "ar", max_new_tokens=40).token_ids
        assert reference[-1] in loaded.eos_token_ids and len(reference) < 40
        out = anchor.run(ids, 40, SamplingParams())
        assert out.token_ids == reference and out.target_passes == len(reference)
        assert anchor.run(ids, 2, SamplingParams()).token_ids == reference[:2]  # the same object, a fresh state
    finally:
        anchor.close()


# ---------------------------------------------------------------- CLI


def test_cli_reports_a_malformed_file_without_loading_a_model(tmp_path, capsys):
    path = write_lines(tmp_path, GOOD, '{"question_id": 2, "turns": [}')
    code = main(["bench", "--prompts", str(path), "--out", str(tmp_path / "out"), "--model", "/nonexistent"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("hasten: error: ") and f"{path}, line 2: not valid JSON" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_cli_rejects_bad_numbers(tmp_path, capsys):
    assert main(["bench", "--limit", "0", "--out", str(tmp_path)]) == 2
    assert "--limit must be >= 1" in capsys.readouterr().err
    assert main(["bench", "--methods", " , ", "--out", str(tmp_path)]) == 2
    assert "--methods is empty" in capsys.readouterr().err
    assert main(["bench", "--threads", "0", "--out", str(tmp_path)]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err
    assert main(["bench", "--compare-backend", "auto", "--out", str(tmp_path)]) == 2
    assert "unknown backend 'auto'" in capsys.readouterr().err
    assert main(["bench", "--backend", "transformers", "--compare-backend", "transformers", "--out",
                 str(tmp_path)]) == 2
    assert "already loaded" in capsys.readouterr().err


def test_cli_refuses_the_primary_backend_as_a_comparison(tmp_path, capsys):
    pytest.importorskip("llama_cpp")
    from tiny_gguf import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    assert main(["bench", "--model", str(path), "--compare-backend", "llamacpp", "--out", str(tmp_path)]) == 2
    assert "repeats the primary backend (llamacpp)" in capsys.readouterr().err
    assert main(["bench", "--model", str(tmp_path), "--backend", "llamacpp", "--out", str(tmp_path / "o")]) == 2
    assert "hasten: error:" in capsys.readouterr().err


@pytest.mark.slow
def test_default_model_end_to_end(default_model, default_model_hf, tmp_path):
    prompts = [p for p in read_prompts() if p.category == "code" and len(p.turns) == 1][:1]
    res = run_bench({"llamacpp": default_model, "transformers": default_model_hf}, prompts,
                    ["ar", "pld", "llamacpp_generate", "hf_generate"], max_new_tokens=16, warmup=0, progress=False)
    assert list(res["methods"]) == ["ar", "pld", "llamacpp_generate", "ar@transformers", "pld@transformers",
                                    "hf_generate"]
    for label in ("pld", "pld@transformers", "hf_generate"):
        assert res["methods"][label]["exact"] is True, (label, res["methods"][label]["mismatches"])
    # llama-cpp-python's own generate may part ways with hasten's ar: its exactness is checked (greedy), whichever
    # way it goes, and agrees with the questions listed as mismatches.
    anchor = res["methods"]["llamacpp_generate"]
    assert anchor["exact"] is (anchor["mismatches"] == [])
    assert set(anchor["mismatches"]) <= {p.question_id for p in prompts}
    assert res["methods"]["ar"]["new_tokens"] > 0
    assert set(res["backends"]) == {"llamacpp", "transformers"}
    write_report(res, tmp_path)
    assert (tmp_path / "report.md").is_file() and (tmp_path / "cost_curve.png").is_file()


@pytest.mark.slow
def test_cli_compare_backend_on_the_default_model(tmp_path, capsys):
    code = main(["bench", "--methods", "ar,pld,llamacpp_pld", "--compare-backend", "transformers", "--limit", "1",
                 "--max-new-tokens", "8", "--warmup", "0", "--threads", "2", "--no-progress", "--out",
                 str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    saved = json.loads((tmp_path / "results.json").read_text())
    assert list(saved["methods"]) == ["ar", "pld", "llamacpp_pld", "ar@transformers", "pld@transformers"]
    assert saved["backends"]["llamacpp"]["threads"] == 2 and saved["machine"]["threads"] == 2
    assert "| pld@transformers |" in capsys.readouterr().out
