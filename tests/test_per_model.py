"""once_per_model: one value per model object, made on first use and dropped with the model."""

import gc
import weakref

from hasten.per_model import once_per_model


class Model:
    pass


class Value:
    def __init__(self, number: int) -> None:
        self.number = number


def test_a_value_is_made_once_per_model_and_dropped_with_it():
    made: list[Model] = []

    @once_per_model
    def value(model: Model) -> Value:
        """The value's docstring."""
        made.append(model)
        return Value(len(made))

    first, second = Model(), Model()
    assert value(first) is value(first) and value(first).number == 1
    assert value(second).number == 2 and value(first).number == 1
    assert made == [first, second] and value.__doc__ == "The value's docstring."
    kept = weakref.ref(value(first))
    made.clear()
    del first
    gc.collect()
    assert kept() is None  # the model went, and its value with it
    assert value(second).number == 2
