"""How wide a drafter drafts: its sizes read from the target's cost curve, wide where width is nearly free.

The published drafters draft wide where a pass over many tokens costs about what a pass over a few does (a GPU;
transformers on a CPU past its first few tokens): lookahead's window of 7 or 15 columns, ReDrafter's many beams.
Where every token costs its share of a pass (llama.cpp on a 2-core CPU: 8 tokens cost 3-4 passes) they keep the
small sizes they had before, and the chooser prunes even those to what pays. Sizes bound only what is drafted,
never what is accepted.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import accumulate
from typing import NamedTuple

CAP = 64  # the widest pass sized for (a curve is measured to 24 tokens and extended along its last two)
SLACK = 0.15  # nearly free: doubling a pass's width adds at most this share to its time
RATIO = 2.0  # and the narrowest such pass costs at most this many one-token passes


class WindowSizes(NamedTuple):
    """Lookahead's window: ``window`` columns (W) of ``ngram - 1`` levels (N), up to ``guesses`` (G) n-grams."""

    window: int
    ngram: int
    guesses: int


class BeamSizes(NamedTuple):
    """ReDrafter's search: ``beam_width`` beams of ``beam_length`` tokens, the root counted."""

    beam_width: int
    beam_length: int


LOOKAHEAD_SMALLEST = WindowSizes(2, 5, 4)  # where no width is free: the sizes lookahead drafted before
REDRAFTER_SMALLEST = BeamSizes(3, 5)  # and ReDrafter's (12 drafted tokens, fewer once merged)
REDRAFTER_LONGEST = 6  # a beam's tokens, the root counted (deeper tokens are rarely reached)
REDRAFTER_WIDEST = 8  # beams


def free_width(cost: Callable[[int], float], cap: int = CAP, slack: float = SLACK, ratio: float = RATIO) -> int:
    """The widest pass, in tokens (the root's included), that ``cost`` (ms by width) makes nearly free; 1 where
    none is (a compute-bound curve).

    The *knee* is the narrowest width past one whose pass costs at most ``1 + slack`` times a pass over half as
    many tokens, and at most ``ratio`` one-token passes (a fixed price for going past one token is paid by any
    draft; a steep one is not a knee). The result is the widest width up to ``cap`` that costs at most ``1 +
    slack`` times the knee. A width is priced at the dearest pass of at most as many tokens, so a dip in a jagged
    curve (transformers on a CPU: 6 and 7 tokens dearer than 8 or 9) never widens the drafts.
    """
    times = [cost(width) for width in range(1, cap + 1)]
    envelope = list(accumulate(times, max))  # envelope[w - 1]: the dearest pass of at most w tokens
    knee = next((w for w in range(2, cap + 1) if envelope[w - 1] <= ratio * times[0]
                 and envelope[w - 1] <= (1 + slack) * envelope[(w + 1) // 2 - 1]), None)
    if knee is None:
        return 1
    return max(w for w in range(knee, cap + 1) if envelope[w - 1] <= (1 + slack) * envelope[knee - 1])


def lookahead_sizes(budget: int, smallest: WindowSizes = LOOKAHEAD_SMALLEST) -> WindowSizes:
    """Lookahead's (W, N, G) for passes of up to ``budget`` tokens: N stays at ``smallest``'s, and the window's
    W·(N-1) tokens, the root and one guess of N-1 fit the budget (the chooser prunes the guesses to what pays on
    the same curve each step, so they are not all reserved); G follows W, as in the paper (7/5/7, 15/5/15).
    Never below ``smallest``."""
    ngram = smallest.ngram
    window = max(smallest.window, (budget - 1 - (ngram - 1)) // (ngram - 1))
    return WindowSizes(window, ngram, max(smallest.guesses, window))


def redrafter_sizes(budget: int, smallest: BeamSizes = REDRAFTER_SMALLEST) -> BeamSizes:
    """ReDrafter's beams for passes of up to ``budget`` tokens: beams x drafted tokens (the length less the root)
    within the budget, the beams lengthened to ``REDRAFTER_LONGEST`` once four of them fit, at most
    ``REDRAFTER_WIDEST`` of them. Never below ``smallest``."""
    drafted = budget - 1
    length = REDRAFTER_LONGEST if drafted >= 4 * (REDRAFTER_LONGEST - 1) else smallest.beam_length
    beams = min(REDRAFTER_WIDEST, drafted // (length - 1))
    if beams < smallest.beam_width:
        return smallest
    return BeamSizes(beams, max(length, smallest.beam_length))
