"""The transformers backend refuses a pass wider than the cache slots left (one per token, however shallow the tree),
with one clear error, before it writes anything; a pass that fills the context exactly runs."""

from __future__ import annotations

import pytest
from conftest import tiny_model

from hasten.backends import TransformersModel
from hasten.errors import HastenError


@pytest.mark.parametrize("pass_width", [None, 16])
def test_a_pass_wider_than_the_room_left_is_refused(pass_width):
    backend = TransformersModel(tiny_model("llama", 0), pass_width=pass_width, static_span=pass_width is not None)
    assert backend.max_context == 256
    target = backend.new_target()
    target.start([(7 * i) % 50 + 2 for i in range(250)])
    with pytest.raises(HastenError, match="^a pass of 11 tokens after 250 cached ones would exceed the model's "
                                          "context of 256 tokens$"):
        target.score([5] + list(range(10, 20)), [-1] + [0] * 10)  # depth 1, width 11
    scores = target.score([5] + list(range(10, 15)), [-1] + [0] * 5)  # width 6: exactly the slots left
    assert tuple(scores.logits.shape) == (6, 64)
    target.commit([0, 3])
    assert target.cache_len == target.cached_length() == 252
    with pytest.raises(HastenError, match="a pass of 5 tokens after 252"):
        target.score([1, 2, 3, 4, 5], [-1, 0, 1, 2, 3])
    assert tuple(target.score([1, 2, 3, 4], [-1, 0, 1, 2]).logits.shape) == (4, 64)
