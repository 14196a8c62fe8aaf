"""What a benchmark ran on: each backend's model, threads and cost curve, and the machine itself."""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from typing import Any

import torch

from hasten.adaptive.cost import CostModel
from hasten.bench.records import BASELINE, label_for
from hasten.models import LoadedModel


def backend_info(models: Mapping[str, LoadedModel], costs: Mapping[str, CostModel],
                 costs_start: Mapping[str, list[float]], primary: str) -> dict[str, dict[str, Any]]:
    """Per backend: the model, its threads, its baseline's label and its cost curve before and after the run."""
    backends = {}
    for backend, model in models.items():
        cost, start = costs[backend], costs_start[backend]
        backends[backend] = {
            "model": model.name, "threads": getattr(model.backend, "threads", None) or torch.get_num_threads(),
            "baseline": label_for(BASELINE, backend, primary),
            "cost": {"widths": list(cost.widths), "millis": start, "millis_end": list(cost.millis),
                     "relative": [m / start[0] for m in start], "key": cost.key},
        }
    return backends


def machine_info(primary: str, backends: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """The platform, Python, torch, threads and CPUs, and the backends that ran."""
    return {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "backend": primary, "backends": list(backends),
            "llamacpp_threads": backends.get("llamacpp", {}).get("threads")}
