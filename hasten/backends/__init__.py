"""Targets: the one small interface through which the verifier reaches a model, and its implementations."""

from hasten.backends.base import ModelBackend, Scores, Target
from hasten.backends.transformers.target import TransformersModel, TransformersTarget

__all__ = ["ModelBackend", "Scores", "Target", "TransformersModel", "TransformersTarget"]
