"""Drafters sized by the cost curve: wide where width is nearly free, the small sizes where it is not, exact."""

from __future__ import annotations

import pytest
from conftest import greedy_reference, random_prompts, tiny_loaded
from test_redrafter import random_head

import hasten
from hasten.adaptive.cost import CostModel
from hasten.adaptive.sizing import (
    CAP,
    LOOKAHEAD_SMALLEST,
    REDRAFTER_SMALLEST,
    BeamSizes,
    WindowSizes,
    free_width,
    lookahead_sizes,
    redrafter_sizes,
)
from hasten.methods import build_proposer
from hasten.sampling import SamplingParams

FLAT = CostModel([1, 64], [10.0, 10.0])  # a GPU-like curve: width is free
LINEAR = CostModel([1, 64], [10.0, 640.0])  # fully compute-bound: n tokens cost n passes
CPU = CostModel([1, 2, 4], [10.0, 14.0, 24.0])
EPYC_LLAMACPP = CostModel([1, 2, 4, 8, 12], [6.98, 11.98, 17.89, 30.18, 42.74])  # 8 tokens cost 4.3 passes
TRANSFORMERS = CostModel([1, 2, 4, 8, 16, 32], [55.5, 76.0, 88.5, 89.0, 92.6, 118.4])  # issue 26, 2-core EPYC


def affine(per_token: float) -> CostModel:
    """A pass costs 10 ms and ``per_token`` ms a token past the first."""
    return CostModel([1, CAP], [10.0, 10.0 + per_token * (CAP - 1)])


def test_free_width_hand_worked():
    assert free_width(FLAT) == CAP
    # Transformers on the CPU: 3 tokens (82.25 ms between 2 and 4) cost 1.08x 2 tokens, the knee; within 15% of
    # it (94.6 ms) lie 16 tokens (92.6) and one more (118.4 at 32: 1.61 ms a token past 16), not 18.
    assert free_width(TRANSFORMERS) == 17
    for compute_bound in (LINEAR, CPU, EPYC_LLAMACPP, affine(2.0)):  # each doubling costs 1.3x or more
        assert free_width(compute_bound) == 1
    # A fixed price for the second token is no knee when it is steep: 3 passes' worth, then flat.
    assert free_width(CostModel([1, 2, 64], [10.0, 30.0, 30.0])) == 1


def test_a_dip_in_a_jagged_curve_does_not_widen_the_drafts():
    widths = list(range(1, 17))
    jagged = [10.0 * w for w in widths]
    jagged[11] = 10.0  # 12 tokens as cheap as one (a kernel's blocking, or a lucky timing)
    assert free_width(CostModel(widths, jagged)) == 1


def test_free_width_does_not_depend_on_the_machines_speed():
    slower = CostModel(TRANSFORMERS.widths, [3 * m for m in TRANSFORMERS.millis])
    assert free_width(slower) == free_width(TRANSFORMERS)


def test_cheaper_width_gives_a_wider_budget_and_wider_sizes():
    curves = [affine(s) for s in (10.0, 2.0, 1.0, 0.5, 0.2, 0.1, 0.05, 0.01, 0.0)]  # ever cheaper width
    first = TRANSFORMERS.millis[0]
    curves += [CostModel(TRANSFORMERS.widths, [first + k * (m - first) for m in TRANSFORMERS.millis])
               for k in (4.0, 2.0, 1.0, 0.5, 0.1)]  # the transformers curve, ever flatter
    budgets = [free_width(curve) for curve in curves[:9]], [free_width(curve) for curve in curves[9:]]
    for family in budgets:
        assert family == sorted(family) and family[0] < family[-1]
    assert budgets[0][0] == 1 and budgets[0][-1] == CAP
    # Sizes never shrink as the budget grows, and never go below the small sizes.
    for smaller, wider in zip(range(1, CAP), range(2, CAP + 1), strict=True):
        for sizes in (lookahead_sizes, redrafter_sizes):
            assert all(a <= b for a, b in zip(sizes(smaller), sizes(wider), strict=True))


def test_sizes_fit_the_budget_where_width_is_free_and_stay_small_where_it_is_not():
    assert lookahead_sizes(1) == LOOKAHEAD_SMALLEST == WindowSizes(2, 5, 4)  # what adaptive lookahead drafted
    assert redrafter_sizes(1) == REDRAFTER_SMALLEST == BeamSizes(3, 5)  # and ReDrafter
    assert lookahead_sizes(CAP) == WindowSizes(14, 5, 14) and redrafter_sizes(CAP) == BeamSizes(8, 6)
    for budget in range(1, CAP + 1):
        window = lookahead_sizes(budget)
        if window != LOOKAHEAD_SMALLEST:  # the root, the window and one guess fit
            assert 1 + (window.window + 1) * (window.ngram - 1) <= budget
            assert window.guesses == max(window.window, LOOKAHEAD_SMALLEST.guesses)
        beams = redrafter_sizes(budget)
        if beams != REDRAFTER_SMALLEST:  # the root and every beam's drafted tokens fit
            assert 1 + beams.beam_width * (beams.beam_length - 1) <= budget
            assert 3 <= beams.beam_length <= 6 and 1 <= beams.beam_width <= 8
    assert lookahead_sizes(free_width(TRANSFORMERS)) == WindowSizes(3, 5, 4)
    assert redrafter_sizes(free_width(TRANSFORMERS)) == BeamSizes(4, 5)


@pytest.fixture
def curve(monkeypatch):
    """Every model's cost curve is the one the test sets (no calibration), frozen against real passes."""
    chosen = {"curve": FLAT}

    def given(*args, **kwargs) -> CostModel:
        model = CostModel(chosen["curve"].widths, chosen["curve"].millis)
        model.observe = lambda width, millis, context=None: None
        return model

    monkeypatch.setattr("hasten.adaptive.cost_model_for", given)
    return chosen


GREEDY = SamplingParams()


def test_methods_size_lookahead_and_redrafter_from_the_curve(curve):
    head = random_head()
    for name, expected_window, expected_beams in (("flat", (14, 5, 14), (8, 6)), ("linear", (2, 5, 4), (3, 5)),
                                                  ("transformers", (3, 5, 4), (4, 5))):
        curve["curve"] = {"flat": FLAT, "linear": LINEAR, "transformers": TRANSFORMERS}[name]
        loaded = tiny_loaded("llama", 3)  # a fresh model: a fresh adaptive state, on this curve
        lookahead = build_proposer("lookahead", loaded, GREEDY)
        assert (lookahead.window, lookahead.ngram, lookahead.guesses) == expected_window, name
        redrafter = build_proposer("redrafter", loaded, GREEDY, head=head)
        assert (redrafter.beam_width, redrafter.beam_length) == expected_beams, name
    # Options given win, each on its own; without adaptivity the fixed sizes stay.
    curve["curve"] = FLAT
    loaded = tiny_loaded("llama", 3)
    lookahead = build_proposer("lookahead", loaded, GREEDY, window=3)
    assert (lookahead.window, lookahead.ngram, lookahead.guesses) == (3, 5, 14)
    lookahead = build_proposer("lookahead", loaded, GREEDY, ngram=3, guesses=2)
    assert (lookahead.window, lookahead.ngram, lookahead.guesses) == (14, 3, 2)
    fixed = build_proposer("lookahead", loaded, GREEDY, adaptive=False)
    assert (fixed.window, fixed.ngram, fixed.guesses) == (2, 5, 2) and fixed.policy is None
    redrafter = build_proposer("redrafter", loaded, GREEDY, head=head, beam_length=3)
    assert (redrafter.beam_width, redrafter.beam_length) == (8, 3)
    fixed = build_proposer("redrafter", loaded, GREEDY, head=head, adaptive=False)
    assert (fixed.beam_width, fixed.beam_length) == (2, 5)


def test_wide_lookahead_and_redrafter_equal_greedy(curve):
    """On a flat curve both draft their widest, the chooser keeps every node: the output is still the target's."""
    curve["curve"] = FLAT
    loaded = tiny_loaded("llama", 3, init_std=0.6)
    head = random_head(seed=4)
    windows = beams = 0.0
    for prompt in random_prompts(6, seed=5):
        prompt = prompt + prompt
        reference = greedy_reference(loaded.model, prompt, 40)
        lookahead = hasten.generate(loaded, prompt, "lookahead", max_new_tokens=40)
        assert lookahead.token_ids == reference
        windows += lookahead.method_stats["window_rate"]
        redrafter = hasten.generate(loaded, prompt, "redrafter", max_new_tokens=40, head=head)
        assert redrafter.token_ids == reference
        beams += redrafter.method_stats["beam_tokens_per_step"]
    assert windows > 0  # the 14-column window ran
    assert beams / 6 > 3 * 4  # more beam tokens a step than the 3 beams of 4 drafted before
