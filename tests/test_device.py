"""Device and dtype plumbing: load_model, the command line, a user's draft and the cost curve's key."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from hasten.adaptive.cost import clock_for, cost_key
from hasten.cli import main
from hasten.errors import HastenError
from hasten.methods import load_draft
from hasten.models import choose_backend, load_model, resolve_device, resolve_dtype

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_model("llama", 1).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_load_model_takes_a_device_and_a_dtype(folder):
    loaded = load_model(str(folder), device="cpu", dtype="bfloat16")
    assert loaded.device == torch.device("cpu") and loaded.dtype == torch.bfloat16
    assert loaded.model.dtype == torch.bfloat16 and loaded.backend.dtype == torch.bfloat16
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert load_model(str(folder), device="cpu", dtype=torch.float16).dtype == torch.float16  # a torch.dtype too


@no_gpu
def test_auto_is_the_cpu_in_float32_without_a_gpu(folder):
    loaded = load_model(str(folder))
    assert loaded.device.type == "cpu" and loaded.dtype == torch.float32
    assert loaded.backend.pass_width is None and not loaded.backend.graphs


def test_auto_dtype_is_bf16_on_cuda_and_fp32_on_the_cpu():
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(HastenError, match="unknown dtype"):
        resolve_dtype("float8")
    with pytest.raises(HastenError, match="unknown device"):
        resolve_device("tpu")


def test_a_gguf_runs_on_transformers_on_cuda_and_llamacpp_is_refused_there():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert choose_backend("auto", "m.gguf", cpu) == "llamacpp"
    assert choose_backend("auto", "m.gguf", cuda) == "transformers"
    assert choose_backend("auto", None, cuda) == "transformers"
    with pytest.raises(HastenError, match="CPU only"):
        choose_backend("llamacpp", "m.gguf", cuda)


@no_gpu
def test_device_cuda_without_a_gpu_is_one_error_line_and_status_2(folder, capsys):
    assert main(["generate", "hi", "--model", str(folder), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hasten: error:") and "no CUDA GPU" in err[0]


def test_a_bad_dtype_is_refused_with_status_2(folder, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "hi", "--model", str(folder), "--dtype", "float8"])
    assert exit_info.value.code == 2
    assert "--dtype" in capsys.readouterr().err


def test_generate_runs_in_bf16_from_the_command_line(folder, capsys):
    args = ["generate", "w5 w6 w7", "--model", str(folder), "--device", "cpu", "--dtype", "bfloat16",
            "--method", "pld", "--no-chat", "--max-new-tokens", "4", "--json"]
    assert main(args) == 0
    assert '"token_ids"' in capsys.readouterr().out


def test_a_users_draft_follows_the_targets_device_and_dtype(folder):
    target = load_model(str(folder), device="cpu", dtype="bfloat16")
    draft = load_draft(target, str(folder))
    assert draft.dtype == torch.bfloat16 and draft.device == target.device


def test_the_cost_key_depends_on_device_dtype_attention_and_graphs():
    def backend(**changes):
        fields = {"backend": "transformers", "device": torch.device("cpu"), "dtype": torch.float32,
                  "attention": "sdpa", "graphs": False} | changes
        return SimpleNamespace(**fields)

    base = cost_key(backend(), "m", 2)
    assert cost_key(backend(), "m", 2) == base
    for change in ({"dtype": torch.bfloat16}, {"attention": "eager"}, {"graphs": True}):
        assert cost_key(backend(**change), "m", 2) != base, change
    if torch.cuda.is_available():
        assert cost_key(backend(device=torch.device("cuda")), "m", 2) != base
    assert clock_for("cpu") is not None and clock_for("cpu")() > 0
