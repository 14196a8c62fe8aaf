"""The distilled draft model: a few llama layers on the target's frozen embeddings (``model``), run as a backend
(``backend``: torch, or its GGUF export on llama.cpp, ``gguf_export``)."""
