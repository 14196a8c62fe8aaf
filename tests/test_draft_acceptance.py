"""scripts/draft_acceptance.py: the acceptance-by-depth arithmetic and the reduced-vocabulary argmax."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from hasten.proposers.reduced_draft import ReducedVocabDraftProposer

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "draft_acceptance.py"
spec = importlib.util.spec_from_file_location("draft_acceptance", SCRIPT)
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)


def test_leading_run_stops_at_the_first_miss_and_at_the_depth():
    row = [True, True, False, True, True, True]
    assert [script.leading_run(row, t, 2) for t in range(5)] == [2, 1, 0, 2, 2]
    assert script.leading_run(row, 3, 4) == 3  # runs off the end of the row


def test_acceptance_by_depth_on_a_toy_match_vector():
    # depth 3 fits at positions 0..3 of the first row and 0 of the second: 5 positions
    rows = [[True, True, False, True, True, True], [True, False, True]]
    result = script.acceptance(rows, 3)
    # runs (capped at 3): row 1 -> 2, 1, 0, 3; row 2 -> 1
    assert result["positions"] == 5
    assert result["acceptance"] == pytest.approx([4 / 5, 2 / 5, 1 / 5])
    assert result["expected_accepted"] == pytest.approx([4 / 5, 6 / 5, 7 / 5])
    empty = script.acceptance([[True]], 2)
    assert empty["positions"] == 0 and empty["acceptance"] == [0.0, 0.0]


def test_top1_over_the_full_vocabulary_is_the_proposers():
    """The reduced logits placed as ``ReducedVocabDraftProposer.vocab_logits`` places them give its argmax."""
    generator = torch.Generator().manual_seed(0)
    vocab_ids = torch.randperm(50, generator=generator)[:12]
    logits = torch.randn(7, 12, generator=generator)
    proposer = ReducedVocabDraftProposer.__new__(ReducedVocabDraftProposer)
    proposer.vocab_ids, proposer.vocab_size = vocab_ids, 50
    expected = [int(proposer.vocab_logits(row).argmax()) for row in logits]
    assert script.full_vocab_top1(logits, vocab_ids, 50) == expected
    assert expected == vocab_ids[logits.argmax(-1)].tolist()
