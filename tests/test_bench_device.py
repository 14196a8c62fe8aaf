"""The bench on a device: the hf_static anchor, results that say where they ran (device, its name, dtype, graph
mode), agreement with transformers' own greedy decoding beside exactness, and a clock that waits for the device."""

from __future__ import annotations

import pytest
import torch
from conftest import greedy_reference, tiny_loaded

import hasten.bench.anchors as anchors
import hasten.bench.runner as runner
from hasten.bench import BenchPrompt, run_bench, write_report
from hasten.bench.runner import conversation_ids
from hasten.errors import HastenError
from hasten.sampling import SamplingParams

PROMPTS = [
    BenchPrompt(1, "copy", ("w5 w6 w7 w8 w9 w5 w6 w7 w8 w9 w5 w6",)),
    BenchPrompt("two-turn", "chat", ("w10 w11 w12 w13 w10 w11", "w20 w21 w22")),
]


@pytest.fixture(scope="module")
def results():
    return run_bench(tiny_loaded(seed=4), PROMPTS, ["ar", "pld", "hf_generate", "hf_static"], max_new_tokens=8,
                     warmup=0, progress=False)


def test_hf_static_decodes_greedily_one_pass_per_token():
    loaded = tiny_loaded(seed=4)
    ids = conversation_ids(loaded, [{"role": "user", "content": PROMPTS[0].turns[0]}])
    out = anchors.run_hf_anchor("hf_static", loaded, ids, 8, SamplingParams())
    assert out.token_ids == greedy_reference(loaded.model, ids, 8)
    assert out.target_passes == len(out.token_ids)


def test_hf_static_runs_on_the_cpu_and_every_method_equals_hf_generate(results):
    for label in ("ar", "pld", "hf_generate", "hf_static"):
        entry = results["methods"][label]
        assert entry["exact"] is True and entry["errors"] == [], label
        assert entry["same_as_hf_generate"] == 1.0, label
    assert results["methods"]["hf_static"]["mean_accepted"] == 1.0


def test_results_say_where_they_ran(results):
    info = results["backends"]["transformers"]
    assert info["device"] == "cpu" and info["dtype"] == "float32" and info["graph_mode"] == "eager"
    assert info["device_name"] == results["machine"]["cpu_model"] and info["device_name"]
    assert info["hf_static"].startswith("eager")
    if not torch.cuda.is_available():
        assert results["machine"]["gpu"] is None


def test_the_report_names_the_device_and_the_hf_agreement(results, tmp_path):
    report = (write_report(results, tmp_path) / "report.md").read_text()
    assert "- transformers: cpu (" in report and "dtype float32, graphs: eager" in report
    assert "## Against transformers' own greedy" in report
    assert "- pld gives the same tokens as hf_generate on 100% of the questions" in report


def test_a_method_that_parts_from_hf_generate_is_counted(monkeypatch):
    real = runner.generate
    loaded = tiny_loaded(seed=4)
    first = conversation_ids(loaded, [{"role": "user", "content": PROMPTS[0].turns[0]}])

    def shifted(loaded, ids, method, **kwargs):  # hasten "decodes differently" on the first question only
        result = real(loaded, ids, method, **kwargs)
        if ids == first:
            result.token_ids = [(t + 1) % 64 for t in result.token_ids]
        return result

    monkeypatch.setattr(runner, "generate", shifted)
    res = run_bench(loaded, PROMPTS, ["ar", "pld", "hf_generate"], max_new_tokens=6, warmup=0, progress=False)
    assert res["methods"]["pld"]["exact"] is True  # against its own ar, shifted alike
    assert res["methods"]["ar"]["same_as_hf_generate"] == 0.5
    assert res["methods"]["pld"]["same_as_hf_generate"] == 0.5


def test_no_hf_agreement_without_hf_generate_or_under_sampling():
    res = run_bench(tiny_loaded(), PROMPTS[:1], ["ar", "pld"], max_new_tokens=4, warmup=0, progress=False)
    assert all("same_as_hf_generate" not in entry for entry in res["methods"].values())
    sampled = run_bench(tiny_loaded(), PROMPTS[:1], ["ar", "hf_generate"], max_new_tokens=4, warmup=0,
                        temperature=1.0, progress=False)
    assert all("same_as_hf_generate" not in entry for entry in sampled["methods"].values())


def test_a_failing_hf_static_is_that_runs_error(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C compiler found\nmore detail")

    monkeypatch.setattr(anchors, "_generate", broken)
    with pytest.raises(HastenError, match="hf_static failed: RuntimeError: no C compiler found$"):
        anchors.run_hf_anchor("hf_static", tiny_loaded(), [5, 6, 7], 4, SamplingParams())
    res = run_bench(tiny_loaded(), PROMPTS[:1], ["ar", "hf_static"], max_new_tokens=4, warmup=0, progress=False)
    assert res["methods"]["hf_static"]["errors"][0]["error"].startswith("hf_static failed")
    assert res["methods"]["ar"]["errors"] == []


def test_runs_are_timed_with_the_backends_device_clock(monkeypatch):
    asked = []

    def clock_for(device):
        asked.append(torch.device(device))
        return lambda: 1.0 + len(asked)

    monkeypatch.setattr(runner, "clock_for", clock_for)
    loaded = tiny_loaded()
    record = runner.run_question("pld", loaded, PROMPTS[0], 4, SamplingParams(), {}, None)
    assert asked == [loaded.backend.device] and record.new_tokens > 0


def test_an_assisted_draft_on_another_device_is_refused():
    target, draft = tiny_loaded(seed=0), tiny_loaded(seed=1)
    draft.backend.model.to("meta")
    reason = anchors.anchor_available("hf_assisted", target, draft)
    assert reason is not None and "target's device cpu" in reason


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_bench_runs_on_cuda_with_the_anchors():
    loaded = tiny_loaded(seed=4)
    loaded.backend.model.to("cuda")
    res = run_bench(loaded, PROMPTS, ["ar", "pld", "hf_generate", "hf_static"], max_new_tokens=8, warmup=1,
                    progress=False)
    info = res["backends"]["transformers"]
    assert info["device"].startswith("cuda") and info["device_name"] == torch.cuda.get_device_name()
    assert res["machine"]["gpu"] == torch.cuda.get_device_name()
    for label, entry in res["methods"].items():
        assert entry["errors"] == [] and entry["exact"] is True, (label, entry["errors"], entry["mismatches"])
        assert entry["same_as_hf_generate"] is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_bench_device_cuda_without_a_gpu_is_one_error_line(tmp_path, capsys):
    from hasten.cli import main

    assert main(["bench", "--device", "cuda", "--methods", "ar", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hasten: error:") and "no CUDA GPU" in err[0]


def test_bench_passes_the_device_and_dtype_to_the_model(tmp_path, capsys):
    import json

    from hasten.cli import main

    folder = tmp_path / "tiny"
    loaded = tiny_loaded(seed=4)
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    out = tmp_path / "out"
    assert main(["bench", "--model", str(folder), "--device", "cpu", "--dtype", "bfloat16", "--methods",
                 "ar,hf_generate", "--limit", "1", "--max-new-tokens", "4", "--warmup", "0", "--no-progress",
                 "--out", str(out)]) == 0
    info = json.loads((out / "results.json").read_text())["backends"]["transformers"]
    assert info["device"] == "cpu" and info["dtype"] == "bfloat16"
