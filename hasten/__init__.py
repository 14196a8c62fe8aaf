"""hasten: lossless speculative decoding (draft models, prompt lookup, lookahead, ReDrafter) for transformers."""

from hasten.api import GenerationResult, StreamEvent, generate, generate_batch, stream
from hasten.errors import HastenError
from hasten.methods import METHODS, build_proposer, load_draft
from hasten.models import LoadedModel, load_model
from hasten.sampling import SamplingParams

__all__ = [
    "METHODS",
    "GenerationResult",
    "HastenError",
    "LoadedModel",
    "SamplingParams",
    "StreamEvent",
    "build_proposer",
    "generate",
    "generate_batch",
    "load_draft",
    "load_model",
    "stream",
]
