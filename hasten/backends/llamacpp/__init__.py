"""The llama.cpp backend: a GGUF model through llama.cpp's C API (ctypes), its targets and their shared context.

Nothing is imported here, so that ``import hasten.backends`` does not load llama.cpp; import ``model.LlamaCppModel``.
"""
