"""Values made once per loaded model and dropped with it (the shipped draft, the shipped ReDrafter head)."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import TypeVar

Model = TypeVar("Model")
Value = TypeVar("Value")


def once_per_model(make: Callable[[Model], Value]) -> Callable[[Model], Value]:
    """``make`` wrapped to run once per model object; the model is held weakly, so its value goes when it does."""
    values: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @functools.wraps(make)
    def get(model: Model) -> Value:
        if model not in values:
            values[model] = make(model)
        return values[model]

    return get
