"""The learning-rate schedule of the draft and head trainers: a cosine that ends at a floor, not at 0."""

from __future__ import annotations

import math

import pytest
import torch

from hasten.training import draft as draft_training
from hasten.training.redrafter import STATE_FILE
from hasten.training.redrafter import TrainConfig as HeadTrainConfig
from hasten.training.redrafter import train as train_head
from hasten.training.schedule import DEFAULT_FLOOR, floor_of, warmup_cosine
from tests.conftest import tiny_loaded
from tests.test_redrafter import fake_distill_data


@pytest.mark.parametrize("total, warmup", [(1, 0), (2, 0), (7, 0), (100, 0), (100, 10), (2547, 50)])
def test_cosine_never_goes_below_the_floor_and_ends_on_it(total, warmup):
    peak, floor = 1e-3, 1e-4
    rates = [warmup_cosine(step, total, peak, floor, warmup) for step in range(total)]
    decay = rates[warmup:]
    assert all(floor <= r <= peak for r in decay)
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))  # it only falls after the warm-up
    if total > warmup + 1:
        assert decay[0] == pytest.approx(peak) and rates[-1] == pytest.approx(floor, rel=1e-12)
    # past the end (a run extended by --resume) it stays on the floor
    assert [warmup_cosine(total + k, total, peak, floor, warmup) for k in range(3)] == [pytest.approx(floor)] * 3


def test_warm_up_rises_linearly_to_the_peak():
    rates = [warmup_cosine(step, 100, 1.0, 0.1, warmup=4) for step in range(6)]
    assert rates[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert rates[4] == pytest.approx(1.0) and rates[5] < 1.0


def test_the_default_floor_is_a_tenth_of_the_peak():
    assert DEFAULT_FLOOR == 0.1
    assert floor_of(5e-4, None) == pytest.approx(5e-5) and floor_of(5e-4, 0.0) == 0.0 and floor_of(5e-4, 1e-5) == 1e-5


def test_draft_trainer_schedule_uses_the_floor():
    cfg = draft_training.TrainConfig(layers=[0], lr=1e-3, warmup=5)
    total = 300
    rates = [draft_training.learning_rate(cfg, step, total) for step in range(total)]
    assert min(rates[5:]) == pytest.approx(1e-4) and rates[-1] == pytest.approx(1e-4)
    assert rates[total // 2] > 1e-4 * 2
    zero = draft_training.TrainConfig(layers=[0], lr=1e-3, min_lr=0.0)
    assert draft_training.learning_rate(zero, total - 1, total) == pytest.approx(0.0, abs=1e-15)
    mid = (total - 1) / 2  # halfway through the cosine the rate is halfway between peak and floor
    assert draft_training.learning_rate(zero, int(mid), total) == pytest.approx(
        1e-3 * 0.5 * (1 + math.cos(math.pi * int(mid) / (total - 1))))


def test_head_trainer_ends_on_the_floor(tmp_path):
    loaded = tiny_loaded("llama", seed=2)
    data = fake_distill_data(loaded.model, count=8)
    config = HeadTrainConfig(steps=12, batch_size=16, lr=1e-2, min_lr=2e-3, horizon=2, draft_vocab=40,
                             state_size=16, holdout=0.0)
    train_head(data, loaded.model, tmp_path, config, progress=False, eval_every=0)
    state = torch.load(tmp_path / STATE_FILE, weights_only=True)
    # the rate of the last update: the scheduler has stepped past it, and the floor holds there too
    assert state["scheduler"]["_last_lr"] == [pytest.approx(2e-3)]
    rates = [warmup_cosine(s, 12, 1e-2, 2e-3, 1) for s in range(12)]
    assert rates[-1] == pytest.approx(2e-3) and min(rates) >= 2e-3 - 1e-12
