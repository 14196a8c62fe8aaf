"""Targets: the one small interface through which the verifier reaches a model."""

from hasten.backends.base import Scores, Target
from hasten.backends.transformers_target import TransformersTarget

__all__ = ["Scores", "Target", "TransformersTarget"]
