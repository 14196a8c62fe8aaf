"""The target's cost curve: a grid over width and cached context, calibrated by passes that read every row,
refined online, and kept on disk under a versioned key."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_loaded

from hasten.adaptive import cost
from hasten.adaptive.cost import CALIBRATION_CONTEXT, CostModel, capped, cost_key, cost_model_for, measure, prune
from hasten.tree import is_chain


def two_contexts() -> CostModel:
    """A grid of two contexts: 100 and 1,100 cached tokens."""
    return CostModel([1, 2, 4], [[10.0, 16.0, 30.0], [20.0, 30.0, 50.0]], "k", contexts=[100, 1100])


def test_cost_curve_interpolates_extrapolates_and_learns_a_scale():
    curve = CostModel([1, 2, 4], [10.0, 16.0, 30.0])
    assert curve(1) == 10.0 and curve(2) == 16.0 and curve(3) == 23.0 and curve(6) == 44.0
    assert curve(2, context=10) == curve(2, context=5000) == 16.0  # one row: the same at every context
    curve.observe(4, 45.0)  # 1.5x the calibration: the whole curve moves by 5% of that
    assert curve.scale == pytest.approx(1.025) and curve(1) == pytest.approx(10.25)
    assert 1.0 < curve.corrections[2] < 1.01  # one pass barely touches the shape
    scale = curve.scale
    curve.observe(3, 1000.0)  # far off the prediction (a preempted pass): ignored
    assert curve.scale == scale
    assert curve.to_json()["millis"] == [[10.0, 16.0, 30.0]]


def test_cost_grid_interpolates_in_context_and_uses_the_context_it_was_told():
    grid = two_contexts()
    assert grid.context == CALIBRATION_CONTEXT
    assert grid(1, context=100) == 10.0 and grid(4, context=1100) == 50.0
    assert grid(1, context=600) == pytest.approx(15.0) and grid(3, context=600) == pytest.approx(31.5)
    assert grid(2, context=0) == 16.0  # shorter than measured: the shortest context's times
    assert grid(1, context=2100) == pytest.approx(30.0)  # longer: extended along the last two contexts
    assert grid.at_context(600) is grid and grid(3) == pytest.approx(31.5)
    assert grid.millis == pytest.approx([15.0, 23.0, 40.0]) and grid.calibrated == pytest.approx([15.0, 23.0, 40.0])
    noisy = CostModel([1, 2], [[10.0, 16.0], [9.0, 15.0]], contexts=[100, 200])  # a noisy second row
    assert noisy(1, context=300) == 9.0  # extended past the longest context, never cheaper than it


def test_online_refinement_keeps_the_shape_where_only_one_width_runs():
    """Long contexts slow every width alike: many slow one-token passes move the scale, never the shape."""
    curve = CostModel([1, 2, 4], [10.0, 16.0, 30.0])
    curve.observe(1, 964.0)  # a preempted pass: far off the prediction, ignored
    assert curve.millis == [10.0, 16.0, 30.0]
    for _ in range(200):
        curve.observe(1, 14.0)
    assert curve(1) == pytest.approx(14.0, abs=0.01)
    assert curve(2) / curve(1) == pytest.approx(1.6) and curve(4) / curve(1) == pytest.approx(3.0)


def test_online_refinement_corrects_a_width_slowly_and_boundedly():
    curve = CostModel([1, 2, 4, 8], [10.0, 16.0, 30.0, 50.0])
    for _ in range(20):  # the real 4-token pass costs 36 ms, not 30; one-token passes agree
        curve.observe(1, 10.0)
        curve.observe(4, 36.0)
    early = curve(4) / curve(1)
    assert 3.0 < early < 3.3  # some evidence: a small step
    for _ in range(2000):
        curve.observe(1, 10.0)
        curve.observe(4, 36.0)
    assert 3.3 < curve(4) / curve(1) <= 3.6  # plentiful evidence: most of the way
    assert curve(2) / curve(1) == pytest.approx(1.6)  # widths never run keep their calibration
    for _ in range(4000):  # passes far slower than calibrated: the correction stops at its bound
        curve.observe(1, 10.0)
        curve.observe(8, 140.0)
    assert curve.corrections[3] == pytest.approx(1 + cost.SHAPE_BOUND)
    assert curve(8) <= 8 * curve(1) + 1e-9  # still at most linear


def test_shape_correction_attributes_a_width_between_measured_ones_to_both():
    curve = CostModel([1, 2, 4], [10.0, 16.0, 30.0])
    for _ in range(500):
        curve.observe(1, 10.0)
        curve.observe(3, 27.6)  # 1.2x the interpolated 23 ms
    low, high = curve.corrections[1:]
    assert low > 1.05 and high > 1.05 and low == pytest.approx(high, rel=0.02)


class RecordingTarget:
    """A target on a fake clock: a pass over n tokens takes ``1 + n + rows`` ms plus 1 per 100 cached tokens, a
    tree (several leaves) ``tree_extra`` more, and the first pass of each shape after each context is cold (+50
    ms). Records every pass."""

    vocab_size = 50

    def __init__(self, clock: list[float], max_context: int = 4000, tree_extra: float = 0.0,
                 by_width: dict[int, float] | None = None) -> None:
        self.clock, self.max_context, self.tree_extra = clock, max_context, tree_extra
        self.by_width = by_width or {}  # ms more for a pass of these widths
        self.cache_len, self.passes = 0, []

    def start(self, context):
        self.cache_len = len(context)

    def score(self, tokens, parents, logits_rows=None):
        rows = len(tokens) if logits_rows is None else len(logits_rows)
        cold = not any(p[:2] == (self.cache_len, list(parents)) for p in self.passes)
        self.passes.append((self.cache_len, list(parents), None if logits_rows is None else list(logits_rows)))
        millis = 1 + len(tokens) + rows + self.cache_len / 100 + (0 if is_chain(parents) else self.tree_extra)
        millis += self.by_width.get(len(tokens), 0.0)
        self.clock[0] += (millis + (50 if cold else 0)) / 1000

    def commit(self, keep):
        self.cache_len += len(keep)

    def truncate(self, length):
        assert length <= self.cache_len
        self.cache_len = length


def test_calibration_reads_every_row_of_chains_and_trees_at_several_contexts():
    clock = [0.0]
    target = RecordingTarget(clock)
    curve = measure(target, widths=(1, 2, 4, 8), contexts=(100, 500, 1000), rounds=3, clock=lambda: clock[0],
                    dense_widths=0,
                    context_widths=(1, 8), context_rounds=3)
    timed = [(length, parents, rows) for length, parents, rows in target.passes if len(rows) > 1 or len(parents) == 1]
    assert all(rows == list(range(len(parents))) for _, parents, rows in timed)  # verification reads every row
    assert {length for length, _, _ in timed} == {100, 500, 1000}
    assert any(not is_chain(parents) for _, parents, _ in timed)  # trees are timed as well as chains
    main = [len(parents) for length, parents, _ in timed if length == 500]
    assert main[1:7] == [1, 2, 4, 8, 4, 8] and main[7:13] == main[1:7]  # rounds go round the shapes
    assert curve.contexts == [100, 500, 1000] and curve.widths == [1, 2, 4, 8]
    # 1 + 2n ms + context/100, the cold passes ignored: the main context exactly, the others rescaled
    assert curve.grid[1] == pytest.approx([8.0, 10.0, 14.0, 22.0])
    assert curve.grid[0][0] == pytest.approx(4.0) and curve.grid[2][-1] == pytest.approx(27.0)
    ratio = 13 / 8 + (27 / 22 - 13 / 8) * 3 / 7  # at width 4, between those measured at 1 and 8
    assert curve.grid[2][2] == pytest.approx(14.0 * ratio)
    assert curve(4, context=750) == pytest.approx((14.0 + 14.0 * ratio) / 2)


def test_calibration_prices_the_dearer_of_a_chain_and_a_tree():
    clock = [0.0]
    curve = measure(RecordingTarget(clock, tree_extra=4.0), widths=(1, 2, 4), contexts=(100,), rounds=3,
                    clock=lambda: clock[0], dense_widths=0)
    assert curve.grid == [pytest.approx([4.0, 6.0, 14.0])]  # width 2 is a chain either way; width 4 a tree


def test_every_width_up_to_16_is_measured_bumps_and_all():
    clock = [0.0]
    slow = {2: 9.0, 3: 9.0, 6: 9.0, 7: 9.0, 10: 9.0, 11: 9.0}  # rows blocked by four: 2 and 3 more of a block
    curve = measure(RecordingTarget(clock, by_width=slow), widths=(1, 2, 3, 4, 6, 8, 12, 16), contexts=(100,),
                    clock=lambda: clock[0])
    assert curve.widths == list(range(1, 17))
    assert curve(7) == pytest.approx(4 + 12 + 9) and curve(8) == pytest.approx(18.0)
    bump = {5: 6.0, 9: 6.0}  # dearer than the listed widths around them, which alone look smooth
    bumpy = measure(RecordingTarget(clock, by_width=bump), widths=(1, 2, 4, 8, 16), contexts=(100,),
                    clock=lambda: clock[0])
    assert bumpy.widths == list(range(1, 17)) and bumpy(5) == pytest.approx(2 + 10 + 6)  # 1 + 2n + 1 + bump
    sparse = measure(RecordingTarget(clock), widths=(1, 2, 4, 8), contexts=(100,), clock=lambda: clock[0],
                     dense_widths=0)
    assert sparse.widths == [1, 2, 4, 8]


def test_calibration_fits_a_short_model_context():
    clock = [0.0]
    target = RecordingTarget(clock, max_context=60)
    curve = measure(target, widths=(1, 2, 4, 8, 64), contexts=(64, 512, 1536), clock=lambda: clock[0])
    assert curve.widths == list(range(1, 9)) and curve.contexts == [50]
    assert curve.context == 50  # priced there until told
    assert max(length + len(parents) for length, parents, _ in target.passes) < 60


def test_the_key_carries_the_version_and_stale_curves_are_deleted(tmp_path, monkeypatch):
    loaded = tiny_loaded("llama", 0)
    key = cost_key(loaded.backend, "tiny", 1)
    monkeypatch.setattr(cost, "COST_VERSION", cost.COST_VERSION + 1)
    assert cost_key(loaded.backend, "tiny", 1) != key  # a new version: old curves are never found
    monkeypatch.undo()
    grid = two_contexts()
    current, old, expired = (tmp_path / f"{name}.json" for name in ("current", "old", "expired"))
    grid.save(current)
    old.write_text(json.dumps({"key": "k", "widths": [1, 2], "millis": [10.0, 15.0], "measured_at": 1e12}))
    grid.save(expired)
    record = json.loads(expired.read_text())
    expired.write_text(json.dumps({**record, "measured_at": record["measured_at"] - cost.MAX_AGE_S - 1}))
    assert CostModel.load(old) is None  # measured the old way: the last row only, one context
    prune(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current.json"]


def test_save_and_load_round_trip(tmp_path):
    path, grid = tmp_path / "curve.json", two_contexts()
    grid.save(path)
    loaded = CostModel.load(path)
    assert loaded is not None and loaded.key == "k" and [p.name for p in tmp_path.iterdir()] == ["curve.json"]
    assert (loaded.widths, loaded.contexts, loaded.grid) == (grid.widths, grid.contexts, grid.grid)
    for width in (1, 3, 9):
        for context in (0, 400, 5000):
            assert loaded(width, context) == grid(width, context)


def test_a_curve_need_not_rise_with_width_but_is_at_most_linear():
    assert capped([1, 2, 3, 4], [60.0, 95.0, 115.0, 82.0]) == [60.0, 95.0, 115.0, 82.0]  # transformers fp32, CPU
    assert capped([1, 2, 4], [10.0, 25.0, 50.0]) == [10.0, 20.0, 40.0]
    curve = CostModel([1, 2, 3, 4], [60.0, 95.0, 115.0, 82.0])
    assert curve(4) < curve(3) and curve(8) == 82.0  # priced as measured; past the widest, never cheaper


def test_a_curve_needs_a_consistent_grid():
    with pytest.raises(ValueError):
        CostModel([2, 1], [1.0, 2.0])
    with pytest.raises(ValueError):
        CostModel([1, 2], [[1.0, 2.0]], contexts=[10, 20])
    with pytest.raises(ValueError):
        CostModel([1, 2], [[1.0, 2.0], [1.0]], contexts=[10, 20])


def test_cost_curve_is_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(cost, "machine_is_busy", lambda: False)
    loaded = tiny_loaded("llama", 0)
    first = cost_model_for(loaded.backend, "tiny", 1, tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 1 and len(first.contexts) > 1
    again = cost_model_for(loaded.backend, "tiny", 1, tmp_path)
    assert again.grid == first.grid and again.key == first.key
    assert cost_model_for(loaded.backend, "tiny", 2, tmp_path).key != first.key  # threads are part of the key


def test_a_busy_machine_or_an_old_curve_is_not_remembered(tmp_path, monkeypatch):
    loaded = tiny_loaded("llama", 0)
    monkeypatch.setattr(cost, "machine_is_busy", lambda: True)
    cost_model_for(loaded.backend, "tiny", 1, tmp_path)
    assert list(tmp_path.glob("*.json")) == []  # measured under load: used now, never saved
    monkeypatch.setattr(cost, "machine_is_busy", lambda: False)
    cost_model_for(loaded.backend, "tiny", 1, tmp_path)
    (path,) = tmp_path.glob("*.json")
    assert CostModel.load(path) is not None
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "measured_at": record["measured_at"] - cost.MAX_AGE_S - 1}))
    assert CostModel.load(path) is None  # a week old: measured again
    path.write_text(json.dumps({key: value for key, value in record.items() if key != "measured_at"}))
    assert CostModel.load(path) is None  # saved before curves carried their date


def test_device_name_asks_cuda_for_the_gpus_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert cost.device_name(torch.device("cuda", 0)) == "NVIDIA H200"
    assert cost.device_name(torch.device("cpu")) == cost.cpu_name()


@pytest.mark.slow
def test_the_default_models_calibration_reads_every_row(default_model):
    """On the real model (llama.cpp): every timed pass reads every row, at every context, trees included, and
    the grid is finite and at most linear. How close it comes to measured passes is ``scripts/cost_check.py``'s
    to say (docs/results/cost): timings do not belong in tests."""
    target = default_model.backend.new_target()
    asked: list[tuple[int, int, int, bool]] = []
    score = target.score

    def recording(tokens, parents, logits_rows=None):
        asked.append((target.cache_len, len(tokens), len(logits_rows), is_chain(parents)))
        return score(tokens, parents, logits_rows)

    target.score = recording
    curve = measure(target)
    timed = [entry for entry in asked if entry[2] > 1 or entry[1] == 1]
    assert all(rows == width for _, width, rows, _ in timed)
    assert {length for length, *_ in timed} == set(curve.contexts) and len(curve.contexts) == 3
    assert any(not chain for *_, chain in timed)
    for row in curve.grid:
        assert all(math.isfinite(m) and 0 < m <= row[0] * w for w, m in zip(curve.widths, row, strict=True))
