"""What a benchmark ran on: each backend's model, device, dtype, graph mode, threads and cost curve, and the
machine itself (CPU model, GPU name)."""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from typing import Any

import torch

from hasten.adaptive.cost import CostModel, cpu_name, device_name
from hasten.bench.anchors import static_mode
from hasten.bench.records import BASELINE, label_for
from hasten.models import LoadedModel


def device_info(model: LoadedModel) -> dict[str, Any]:
    """Where a backend runs: the device, its name (the GPU's, or the CPU model), the dtype (None where the
    backend names none, as llama.cpp's quantized weights) and whether its passes replay CUDA graphs."""
    backend = model.backend
    device = torch.device(getattr(backend, "device", None) or "cpu")
    dtype = getattr(backend, "dtype", None)
    info = {
        "device": str(device),
        "device_name": device_name(device),
        "dtype": str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else None,
        "graph_mode": "cuda-graphs" if getattr(backend, "graphs", False) else "eager",
    }
    if backend.backend == "transformers":
        info["hf_static"] = static_mode(model)
    return info


def backend_info(models: Mapping[str, LoadedModel], costs: Mapping[str, CostModel],
                 calibrated: Mapping[str, CostModel], primary: str) -> dict[str, dict[str, Any]]:
    """Per backend: the model, its threads and device, its baseline's label and its cost curve before and after
    the run (``millis``: calibrated, at the context a curve assumes until told; ``grid``: at every context)."""
    backends = {}
    for backend, model in models.items():
        cost, context = costs[backend], calibrated[backend].context  # the context assumed until told
        start = calibrated[backend].calibrated_at(context)
        backends[backend] = {
            "model": model.name, "threads": getattr(model.backend, "threads", None) or torch.get_num_threads(),
            **device_info(model),
            "baseline": label_for(BASELINE, backend, primary),
            "cost": {"widths": list(cost.widths), "millis": start, "context": context,
                     "millis_end": [cost.scale * m for m in cost.shape_at(context)],
                     "scale_end": cost.scale, "corrections_end": cost.corrections,
                     "relative": [m / start[0] for m in start], "contexts": list(cost.contexts),
                     "grid": calibrated[backend].grid, "key": cost.key},
        }
    return backends


def machine_info(primary: str, backends: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """The platform, Python, torch, threads, the CPU model and the GPU (None without one), and the backends."""
    return {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "cpu_model": cpu_name(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "cuda": torch.version.cuda,
            "backend": primary, "backends": list(backends),
            "llamacpp_threads": backends.get("llamacpp", {}).get("threads")}
