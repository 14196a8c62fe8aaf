"""llama-cpp-python's low-level API, initialised once, with llama.cpp's log captured instead of printed.

llama.cpp reports why a load, a context or a decode failed only in its log; the last warnings and errors are
kept here so that a failure can name its cause (``first_logged_error``).

ggml's tiled K-quant matmul (``GGML_CPU_TILED_MM``) is turned off before any model loads: it takes over passes of
8 or more tokens where weights are not repacked (CPUs that report AMX, where hasten leaves the repacking extra
buffers off) and changes their rows' logits (by up to 5.2 on Gemma 3 270M Q4_K_M on an Intel Xeon), so a
verification pass would no longer score what plain decoding does. Without it, a chain of 16 tokens scores
bit-identically to 16 one-token passes there.
"""

from __future__ import annotations

import collections
import os
import threading
from typing import Any

from hasten.errors import HastenError

_LOG_WARN, _LOG_ERROR, _LOG_CONT = 3, 4, 5
_log_lines: collections.deque[tuple[int, str]] = collections.deque(maxlen=32)
_log_callback: Any = None  # the ctypes callback must outlive every llama.cpp call
_init_lock = threading.Lock()


def load_llama_cpp() -> Any:
    """The ``llama_cpp`` module, its backend initialised and its logging captured (once per process)."""
    global _log_callback
    try:
        import llama_cpp
    except ImportError as error:
        raise HastenError("the llama.cpp backend needs llama-cpp-python: pip install llama-cpp-python") from error
    with _init_lock:
        if _log_callback is None:
            def record(level: int, text: bytes | None, _user: Any) -> None:
                if text and level in (_LOG_WARN, _LOG_ERROR, _LOG_CONT):
                    _log_lines.append((level, text.decode("utf-8", "replace")))

            os.environ["GGML_CPU_TILED_MM"] = "0"  # batch-invariant rows (module docstring), before any model loads
            _log_callback = llama_cpp.llama_log_callback(record)
            llama_cpp.llama_log_set(_log_callback, None)
            llama_cpp.llama_backend_init()
    return llama_cpp


def clear_log() -> None:
    """Forget the captured log (before a call whose failure should be explained by its own messages)."""
    _log_lines.clear()


def first_logged_error(default: str) -> str:
    """The first error llama.cpp logged since the log was last cleared (its function-name prefix dropped)."""
    for level, text in _log_lines:
        if level == _LOG_ERROR:
            return text.strip().split(": ", 1)[-1]
    return default


__all__ = ["clear_log", "first_logged_error", "load_llama_cpp"]
