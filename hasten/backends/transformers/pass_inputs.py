"""The inputs of a scoring pass in static device buffers: token ids, positions, cache slots and the tree block.

On CUDA each buffer has a pinned host twin and is filled with a non-blocking copy, so staging a pass never waits
for the GPU; before the host twin is written again, the previous copy is waited for (an event, normally long
done because every step syncs once on its verdict). On the CPU the buffers are filled directly. The views handed
out keep their addresses for a given width, which is what a captured CUDA graph needs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class PassInputs:
    """Static buffers for passes of up to ``rows`` tokens (grown on demand; ``generation`` counts regrowths)."""

    def __init__(self, device: torch.device, rows: int = 64) -> None:
        self.device = device
        self.pinned = device.type == "cuda"
        self.generation = 0
        self._copied = torch.cuda.Event() if self.pinned else None
        self._allocate(rows)

    def _allocate(self, rows: int) -> None:
        self.size = rows
        # ids, positions, slots; two rows for moved cache slots (source, destination); the rows to return
        self.host_ints = torch.zeros(6, rows, dtype=torch.long, pin_memory=self.pinned)
        self.host_block = torch.zeros(rows * rows, dtype=torch.bool, pin_memory=self.pinned)
        if self.pinned:
            self.ints = torch.zeros(6, rows, dtype=torch.long, device=self.device)
            self.block_flat = torch.zeros(rows * rows, dtype=torch.bool, device=self.device)
        else:
            self.ints, self.block_flat = self.host_ints, self.host_block

    def _host_ready(self) -> None:
        if self._copied is not None:
            self._copied.synchronize()

    def _send(self, host: torch.Tensor, device: torch.Tensor) -> None:
        if self.pinned:
            device.copy_(host, non_blocking=True)

    def stage(self, ids: Sequence[int], positions: Sequence[int], slots: Sequence[int], block: torch.Tensor,
              rows: Sequence[int] = ()) -> None:
        """Fill the first ``w = len(ids)`` entries of each buffer; ``block`` is bool (w, w) on the host; ``rows``
        (at most w) are the rows whose outputs are read."""
        width = len(ids)
        self._reserve(width)
        for row, values in ((0, ids), (1, positions), (2, slots), (5, rows)):
            self._write(row, values)
        self.host_block[: width * width] = block.reshape(-1)
        self._send(self.host_block[: width * width], self.block_flat[: width * width])
        self._sent()

    def stage_moves(self, source: Sequence[int], destination: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Device index tensors of cache slots to move (a commit of a path that is not a prefix)."""
        count = len(source)
        self._reserve(count)
        self._write(3, source)
        self._write(4, destination)
        self._sent()
        return self.ints[3, :count], self.ints[4, :count]

    def _reserve(self, count: int) -> None:
        """Room for ``count`` entries (regrown if needed), and host buffers free to write."""
        if count > self.size:
            self._allocate(max(count, 2 * self.size))
            self.generation += 1
        self._host_ready()

    def _write(self, row: int, values: Sequence[int]) -> None:
        count = len(values)
        self.host_ints[row, :count] = torch.as_tensor(values, dtype=torch.long)
        self._send(self.host_ints[row, :count], self.ints[row, :count])

    def _sent(self) -> None:
        """Mark the copies just queued, so the next staging waits for them before writing the host buffers."""
        if self._copied is not None:  # on the stream of the buffers' device (the copies' stream), not the current one's
            self._copied.record(torch.cuda.current_stream(self.device))

    def rows(self, count: int) -> torch.Tensor:
        """The pass rows whose outputs are returned (staged with the pass)."""
        return self.ints[5, :count]

    def ids(self, width: int) -> torch.Tensor:
        return self.ints[0, :width][None]

    def positions(self, width: int) -> torch.Tensor:
        return self.ints[1, :width][None]

    def slots(self, width: int) -> torch.Tensor:
        return self.ints[2, :width]

    def block(self, width: int) -> torch.Tensor:
        return self.block_flat[: width * width].view(width, width)
