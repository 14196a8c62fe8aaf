"""Whether a model's weight kernels score each row of a wide pass as a one-token pass does, bit for bit.

llama.cpp's *extra buffers* (``use_extra_bufts``) repack some weight types (Q4_0, Q4_K, IQ4_NL, ...) into
interleaved layouts whose batched matmul sums in another order than the one-row kernel. On a 2-core AMD EPYC
(Zen 4, AVX-512) Gemma 3 270M Q4_K_M's rows then moved by up to 5.6 from four tokens a pass on, while the default
model (Q4_1, not repacked) stayed bit-identical. A verifier whose wide passes round otherwise than plain decoding
can part from it at a near-tie, so a model whose rows differ is loaded without extra buffers
(``model.LlamaCppModel``); without them every pass takes the plain kernels, which costs only speed.
"""

from __future__ import annotations

from typing import Protocol

import torch

from hasten.backends.llamacpp.target import LlamaCppTarget

PROBE_CONTEXT = 8  # tokens cached before the probe's chain
PROBE_WIDTHS = (2, 4, 8, 16)  # pass widths compared with one-token passes (kernels switch by row count)


class TargetMaker(Protocol):
    """What the probe needs of a model: its vocabulary size and a fresh target."""

    vocab_size: int

    def new_target(self, want_hidden: bool = False) -> LlamaCppTarget: ...


def rows_are_batch_invariant(model: TargetMaker) -> bool:
    """Whether a chain scored in one pass of each of ``PROBE_WIDTHS`` tokens gives, row for row, the logits of the
    same tokens scored one at a time (bit-identical)."""
    vocab = model.vocab_size
    context = [(7 * i + 3) % vocab for i in range(PROBE_CONTEXT)]
    chain = [(13 * i + 5) % vocab for i in range(max(PROBE_WIDTHS))]
    target = model.new_target()
    try:
        target.start(context)
        alone = []
        for token in chain:
            alone.append(target.score([token], [-1]).logits[0].clone())
            target.commit([0])
        for width in PROBE_WIDTHS:
            target.truncate(len(context))
            together = target.score(chain[:width], list(range(-1, width - 1))).logits
            target.commit([])
            if not torch.equal(together, torch.stack(alone[:width])):
                return False
        return True
    finally:
        target.close()
