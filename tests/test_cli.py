"""The command line: JSON output, and a clear one-line error (exit 2, no traceback) for each kind of bad input."""

import json
import subprocess
import sys

import pytest
from conftest import tiny_model, tiny_tokenizer

from hasten.cli import main


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A tiny target, a same-vocabulary draft and a different-vocabulary draft, saved as local model folders."""
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for name, vocab, layers in [("target", 64, 2), ("draft", 64, 1), ("other_vocab", 48, 1)]:
        path = root / name
        tiny_model("llama", 1, vocab_size=vocab, layers=layers).save_pretrained(path)
        tiny_tokenizer(vocab).save_pretrained(path)
        dirs[name] = str(path)
    return dirs


def run_cli(capsys, *args):
    code = main(["generate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_json_output_on_a_local_model(capsys, model_dirs):
    code, out, _ = run_cli(capsys, "w5 w6 w7 w5 w6", "--model", model_dirs["target"], "--no-chat", "--json",
                           "--max-new-tokens", "8", "--method", "pld")
    assert code == 0
    record = json.loads(out)
    assert set(record) >= {"text", "token_ids", "method", "target_passes", "mean_accepted", "tokens_per_s"}
    assert record["method"] == "pld" and 1 <= len(record["token_ids"]) <= 8
    assert record["mean_accepted"] >= 1.0


def test_draft_method_with_a_local_draft(capsys, model_dirs):
    code, out, err = run_cli(capsys, "w5 w6 w7", "--model", model_dirs["target"], "--no-chat", "--method", "draft",
                             "--draft-model", model_dirs["draft"], "--max-new-tokens", "6")
    assert code == 0, err
    assert "tokens per pass" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["   "], "prompt is empty"),
        (["w3 w4", "--max-new-tokens", "0"], "max-new-tokens"),
        (["w3 w4", "--temperature", "-1"], "temperature"),
        (["w3 w4", "--top-p", "1.5"], "top_p"),
        (["w3 w4", "--top-p", "0"], "top_p"),
        (["w3 " * 300], "context"),
        (["w3 w4", "--method", "draft"], "draft model"),
    ],
)
def test_bad_input_gives_one_clear_line(capsys, model_dirs, args, message):
    code, _, err = run_cli(capsys, *args, "--model", model_dirs["target"], "--no-chat")
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("hasten: error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


def test_missing_model_and_mismatched_draft(capsys, model_dirs, tmp_path):
    code, _, err = run_cli(capsys, "hello", "--model", str(tmp_path / "nowhere"))
    assert code == 2 and "not found" in err and "hub" in err
    code, _, err = run_cli(capsys, "w3 w4", "--model", model_dirs["target"], "--no-chat", "--method", "draft",
                           "--draft-model", model_dirs["other_vocab"])
    assert code == 2 and "vocabulary" in err


def test_the_installed_command_exits_non_zero_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hasten.cli", "generate", "hi", "--model", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("hasten: error: model")
    assert "Traceback" not in proc.stderr


def test_prompts_file_is_decoded_as_one_batch(capsys, model_dirs, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('w5 w6 w7 w5 w6\n\n{"prompt": "w9 w8 w9 w8"}\n')
    code, out, _ = run_cli(capsys, "--prompts", str(prompts), "--model", model_dirs["target"], "--no-chat", "--json",
                           "--max-new-tokens", "6", "--method", "pld")
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in records] == ["w5 w6 w7 w5 w6", "w9 w8 w9 w8"]
    for record in records:  # the same tokens as the prompt alone
        code, single, _ = run_cli(capsys, record["prompt"], "--model", model_dirs["target"], "--no-chat", "--json",
                                  "--max-new-tokens", "6", "--method", "pld")
        assert json.loads(single)["token_ids"] == record["token_ids"]


@pytest.mark.parametrize("content, message", [("", "holds no prompts"), ('{"prompt": 3}\n', "non-empty string"),
                                              ("{oops\n", "not a JSON object")])
def test_bad_prompts_file_is_one_line_error(capsys, model_dirs, tmp_path, content, message):
    prompts = tmp_path / "p.txt"
    prompts.write_text(content)
    code, _, err = run_cli(capsys, "--prompts", str(prompts), "--model", model_dirs["target"])
    assert code == 2 and message in err and err.count("\n") == 1
