"""CUDA graphs for the scoring passes: one graph per pass width, captured on first use, replayed after.

A pass's forward reads only static buffers (``PassInputs``, the ``TreeMask`` rows, the ``StaticKV`` tensor), so
replaying its graph after the inputs are staged runs the same kernels on the new inputs, with one launch instead
of about a thousand. The outputs are the graph's own buffers, overwritten by the next replay: the target copies
the rows it returns out of them at once, so ``Scores`` never alias them.

Capture needs a forward without host syncs. transformers' mask preparation returns a 4-D mask (or a dict of
them) as it is, before any data-dependent check (``masking_utils._preprocess_mask_arguments``), explicit
position ids skip ``get_seq_length``, and ``StaticKV.update`` is two ``index_copy_`` at device slots. RoPE
variants that look at the positions' values (``longrope``, ``dynamic``) would sync and are not captured
safely; the supported architectures' defaults do not. Only used on CUDA.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Outputs = tuple[torch.Tensor, torch.Tensor | None]
WARMUP_RUNS = 2  # eager runs on a side stream before capture (cuBLAS/cuDNN workspaces, lazy inits)


class GraphRunner:
    """Runs ``forward(width)`` through a captured CUDA graph per width (all graphs share one memory pool).

    ``forward`` must read and write only static buffers, so that a replay equals an eager call made with the
    inputs staged at that time. The warm-up runs before capture recompute the very pass being scored (the inputs
    are staged already), so their cache writes are the ones the replay makes again.
    """

    def __init__(self, forward: Callable[[int], Outputs], device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.forward = forward
        self.device = device
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Outputs]] = {}
        self.pool: tuple[int, int] | None = None

    def reset(self) -> None:
        """Drop every graph (the static buffers they captured were replaced)."""
        self.graphs.clear()

    def run(self, width: int) -> Outputs:
        entry = self.graphs.get(width)
        if entry is None:
            entry = self.graphs[width] = self._capture(width)
        graph, outputs = entry
        graph.replay()
        return outputs

    def _capture(self, width: int) -> tuple[torch.cuda.CUDAGraph, Outputs]:
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                self.forward(width)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=side):  # on this device (the default is the current one's)
            outputs = self.forward(width)
        self.pool = graph.pool()
        return graph, outputs
