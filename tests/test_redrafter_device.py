"""The ReDrafter head and its beam search follow the target's device and dtype.

On a machine without a GPU the ``meta`` device stands in for one: a CPU tensor mixed into a computation on
``meta`` tensors raises, so a head and a search that run there make no tensor on the host.
"""

from __future__ import annotations

import time

import pytest
import torch
from test_redrafter import random_head

import hasten.proposers.redrafter as redrafter
from hasten.proposers.redrafter import HeadDrafter, ReDrafterProposer
from hasten.redrafter.beam import beam_search

VOCAB, HIDDEN = 64, 32


class FakeTarget:
    """A backend's view for the head: its tables, and optionally the device and dtype it names."""

    backend = "fake"

    def __init__(self, device: str = "cpu", dtype: torch.dtype | None = None, named: bool = True) -> None:
        gen = torch.Generator().manual_seed(0)
        table_dtype = dtype or torch.float32
        self.embedding = torch.randn(VOCAB, HIDDEN, generator=gen).to(device, table_dtype)
        self.output = torch.randn(VOCAB, HIDDEN, generator=gen).to(device, table_dtype)
        if named:
            self.device = torch.device(device)
            self.dtype = dtype

    def input_embeddings(self) -> torch.Tensor:
        return self.embedding

    def output_embeddings(self) -> torch.Tensor:
        return self.output


def tensors(head) -> list[torch.Tensor]:
    tables = head.tables()
    return [*head.parameters(), *head.buffers(), head.embedding, head.output, tables.input_rows, tables.column]


def test_the_head_and_its_tables_move_to_the_targets_device_and_dtype(device):
    head = random_head().attach(FakeTarget(device, torch.float64))
    assert all(t.device.type == device for t in tensors(head))
    assert {t.dtype for t in tensors(head) if t.is_floating_point()} == {torch.float64}
    assert head.draft_ids.dtype == torch.long


def test_a_target_that_names_neither_gets_a_float32_head_beside_its_embeddings():
    head = random_head().attach(FakeTarget(dtype=torch.float64, named=False))
    assert head.proj.weight.dtype == torch.float32 and head.output.dtype == torch.float32
    assert head.proj.weight.device.type == "cpu"


def test_a_training_module_leaves_the_head_where_it_is():
    module = torch.nn.Module()
    module.get_input_embeddings = lambda: torch.nn.Embedding(VOCAB, HIDDEN).double()
    module.get_output_embeddings = lambda: torch.nn.Linear(HIDDEN, VOCAB).double()
    head = random_head().attach(module)
    assert head.proj.weight.dtype == torch.float32 and head.output.dtype == torch.float32


@torch.inference_mode()
def test_beam_search_makes_no_tensor_on_the_host():
    head = random_head().attach(FakeTarget("meta"))
    outside = next(t for t in range(VOCAB) if t not in set(random_head().draft_ids.tolist()))
    for root in (int(random_head().draft_ids[0]), outside):  # the root inside and outside the draft vocabulary
        beams = beam_search(HeadDrafter(head, torch.zeros(HIDDEN, device="meta")), root, 4, 3)
        assert beams.tokens.device.type == "meta" and beams.tokens.shape == (4, 3)
        assert beams.scores.shape == (4,) and beams.token_log_probs.shape == (4, 3)


@torch.inference_mode()
@pytest.mark.parametrize("width", [1, 3])
def test_the_device_drafts_the_cpus_beams(device, width):
    hidden = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(4))
    on_cpu = random_head().attach(FakeTarget("cpu", torch.float64))
    on_device = random_head().attach(FakeTarget(device, torch.float64))
    for root in (int(on_cpu.draft_ids[3]), 0, 5):
        want = beam_search(HeadDrafter(on_cpu, hidden), root, width, 4)
        got = beam_search(HeadDrafter(on_device, hidden.to(device)), root, width, 4)
        assert got.tokens.device.type == device
        assert torch.equal(got.tokens.cpu(), want.tokens)
        torch.testing.assert_close(got.scores.cpu(), want.scores)


def test_the_search_is_timed_until_its_beams_are_read_back(monkeypatch):
    """On CUDA ``beam_search`` only queues kernels: its cost, which decides whether it runs, is the time until
    its beams reach the host. Here the read-back of a stand-in tensor takes the 50 ms the queued work would."""

    class Queued(torch.Tensor):
        def tolist(self):
            time.sleep(0.05)
            return super().tolist()

    real = redrafter.beam_search

    def queued_search(*args):
        beams = real(*args)
        return type(beams)(beams.tokens.as_subclass(Queued), beams.scores, beams.token_log_probs)

    monkeypatch.setattr(redrafter, "beam_search", queued_search)
    proposer = ReDrafterProposer(random_head().attach(FakeTarget()), beam_width=2, beam_length=3)
    proposer.start([1, 2, 3], torch.zeros(1, HIDDEN))
    paths, _ = proposer.draft_beams([1, 2, 3], 4)
    assert len(paths) == 2 and proposer.search.cost_ms >= 50
