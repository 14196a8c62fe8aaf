"""The transformers backend: a torch model with a static KV cache and a device-side tree mask, and transformers' own
generate (the bench's anchors).

This package's modules import the ``transformers`` library by its absolute name, which this package never shadows.
"""
