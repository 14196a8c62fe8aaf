"""hasten bench: the prompt reader, the runner's results on tiny models, the report files and the CLI's errors."""

from __future__ import annotations

import json

import pytest
from conftest import greedy_reference, tiny_loaded

import hasten.bench.runner as runner
from hasten.bench import BenchPrompt, balanced_subset, read_prompts, run_bench, shipped_prompts_path, write_report
from hasten.bench.runner import conversation_ids, rotated, run_question
from hasten.cli import main
from hasten.errors import HastenError
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
    assert 30 <= len(prompts) <= 40
    categories = {p.category for p in prompts}
    assert categories == {"chat", "code", "summarization", "math", "translation", "rag"}
    assert sum(len(p.turns) > 1 for p in prompts) >= 3


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
            assert set(part) == {"speedup", "speedup_own", "mean_accepted", "tokens_per_s", "oracle"}
            assert part["speedup"] > 0 and part["mean_accepted"] >= 1.0 and part["tokens_per_s"] > 0
            assert part["speedup_own"] == part["speedup"]  # one backend: its ar is the primary ar
        assert entry["backend"] == "transformers" and entry["baseline"] == "ar"
        assert entry["speedup_own"] == entry["speedup"]
        if method.startswith("hf_"):
            assert entry["draft_ms_per_step"] is None and entry["mean_drafted"] is None, method
        else:
            assert entry["draft_ms_per_step"] >= 0 and entry["mean_drafted"] >= 0, method
    assert res["methods"]["ar"]["speedup"] == 1.0
    assert res["methods"]["ar"]["mean_accepted"] == 1.0
    assert res["methods"]["ar"]["mean_drafted"] == 0.0 and res["methods"]["ar"]["plain_steps"] == 1.0
    pld = res["methods"]["pld"]
    assert 0.0 <= pld["plain_steps"] <= 1.0 and pld["mean_drafted"] > 0 and "mean_drafted" in pld["method_stats"]
    assert pld["oracle"] > 0 and pld["oracle_mean_accepted"] >= 1.0
    assert all(part["oracle"] > 0 for part in pld["categories"].values())
    assert res["methods"]["ar"]["oracle"] is None and res["methods"]["hf_pld"]["oracle"] is None
    cost = res["backends"]["transformers"]["cost"]
    assert cost["widths"][0] == 1 and len(cost["widths"]) == len(cost["millis"]) == len(cost["millis_start"])
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
    assert ("| method | copy | chat | overall | vs own ar | oracle | tokens/pass | tokens/s | draft ms/step | "
            "drafted/step | plain steps | exact |") in report
    for method in ALL:
        assert f"| {method} |" in report
    assert "no_such_method" in report
    assert "## Oracle bound per category" in report and "| pld | " in report.split("## Oracle bound")[1]
    assert "## Cost curve" in report and "| tokens scored | transformers ms | transformers x one token |" in report
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


def test_sampling_does_not_claim_exactness():
    res = run_bench(tiny_loaded(), PROMPTS[:1], ["ar", "pld", "hf_generate"], max_new_tokens=4, warmup=0,
                    temperature=1.0, progress=False)
    assert all(entry["exact"] is None for entry in res["methods"].values())
    assert res["exactness_checked"] is False
    assert any("not checked" in warning for warning in res["warnings"])


def test_bad_arguments():
    with pytest.raises(HastenError, match="max_new_tokens"):
        run_bench(tiny_loaded(), PROMPTS, ["ar"], max_new_tokens=0, progress=False)
    with pytest.raises(HastenError, match="no prompts"):
        run_bench(tiny_loaded(), [], ["ar"], progress=False)


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


@pytest.mark.slow
def test_default_model_end_to_end(default_model, tmp_path):
    prompts = [p for p in read_prompts() if p.category == "code" and len(p.turns) == 1][:1]
    res = run_bench(default_model, prompts, ["ar", "pld", "hf_generate"], max_new_tokens=16, warmup=0,
                    progress=False)
    assert all(entry["exact"] is True for entry in res["methods"].values()), res["methods"]
    assert res["methods"]["ar"]["new_tokens"] > 0
    write_report(res, tmp_path)
    assert (tmp_path / "report.md").is_file()
