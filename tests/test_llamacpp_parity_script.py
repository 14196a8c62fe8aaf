"""scripts/llamacpp_parity.py: reading llama-completion's perf lines, the summary arithmetic, the timing lock."""

from __future__ import annotations

import fcntl
import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "llamacpp_parity.py"
spec = importlib.util.spec_from_file_location("llamacpp_parity", SCRIPT)
assert spec is not None and spec.loader is not None
script = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = script  # its dataclass looks its module up
spec.loader.exec_module(script)

PERF_LOG = """\
common_perf_print:    sampling time =      12.31 ms
common_perf_print:    samplers time =       6.02 ms /   230 tokens
common_perf_print:        load time =     190.55 ms
common_perf_print: prompt eval time =     320.00 ms /   100 tokens (    3.20 ms per token,   312.50 tokens per second)
common_perf_print:        eval time =    1016.00 ms /   127 runs   (    8.00 ms per token,   125.00 tokens per second)
common_perf_print:       total time =    1400.00 ms /   227 tokens
common_perf_print:    graphs reused =        126
"""


def test_perf_lines_become_a_timing():
    timing = script.parse_perf(PERF_LOG)
    assert timing == script.Timing(prompt_tokens=100, new_tokens=128, prefill_s=0.32, wall_s=1.4, eval_s=1.016)
    assert script.parse_perf(PERF_LOG.replace("eval time", "evaluation")) is None  # a line missing


def test_summary_pools_prefill_and_decode_over_prompts():
    runs = [script.Timing(100, 11, 0.3, 0.4), script.Timing(300, 21, 0.9, 1.3)]
    row = script.summary(runs)
    assert row["prompt_tokens"] == 400 and row["new_tokens"] == 32
    assert row["prefill_ms"] == pytest.approx(1e3 * 1.2 / 400)
    assert row["decode_ms"] == pytest.approx(1e3 * (0.1 + 0.4) / 30)  # the tokens after each prefill's first
    assert row["decode_ms_median"] == pytest.approx(1e3 * (0.01 + 0.02) / 2)
    assert row["tokens_per_s"] == pytest.approx(32 / 1.7)
    assert "eval_ms" not in row
    with_eval = script.summary([script.Timing(100, 11, 0.3, 0.4, eval_s=0.08)])
    assert with_eval["eval_ms"] == pytest.approx(8.0)


def test_the_lock_holders_are_read_from_proc_locks(tmp_path):
    path = tmp_path / "timing.lock"
    path.touch()
    assert script._holders(path) == set()
    with open(path) as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        holders = script._holders(path)
    assert len(holders) == 1 and holders <= script._ancestors()  # this process holds it


def test_every_cpp_run_comes_after_ar_and_the_order_rotates():
    names = [script.TOOL, f"{script.TOOL}, q8_0/f16 cache", script.AR, script.PYTHON]
    orders = [script.order_for(names, index) for index in range(len(names))]
    for order in orders:
        assert sorted(order) == sorted(names)
        assert all(order.index(name) > order.index(script.AR) for name in names[:2])
    assert len({tuple(order) for order in orders}) > 1
    assert {order[0] for order in orders} == {script.AR, script.PYTHON}  # ar or llama-cpp-python opens a prompt
