"""The target's cost curve: wall time of one pass as a function of the tokens it scores.

Measured once per backend, model, thread count, CPU, device, dtype and graph mode in a calibration of a few
seconds (with a clock that waits for the GPU on CUDA), kept on disk, and scaled online by the real passes (its
shape, what n tokens cost relative to one, stays the calibration's).
Speculation pays only where tokens gained are worth more than the extra width costs, so every adaptive choice
asks this curve.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from bisect import bisect_left
from collections.abc import Callable
from pathlib import Path

import torch

from hasten.backends.base import ModelBackend, Target

CACHE_DIR = Path(os.environ.get("HASTEN_CACHE", Path.home() / ".cache" / "hasten")) / "costs"
CALIBRATION_WIDTHS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
CALIBRATION_CONTEXT = 200
ONLINE_WEIGHT = 0.05  # weight of one measured pass in the running estimate of the curve's scale
MAX_AGE_S = 7 * 24 * 3600.0  # a saved curve is measured again after a week (drivers, builds and loads change)
OUTLIER = 3.0  # a pass this many times off its prediction (preempted, or a cold cache) teaches nothing


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class CostModel:
    """Milliseconds per pass by width, linearly interpolated between measured widths (and extrapolated)."""

    def __init__(self, widths: list[int], millis: list[float], key: str = "") -> None:
        if not widths or len(widths) != len(millis) or sorted(widths) != list(widths):
            raise ValueError("a cost curve needs increasing widths, one time each")
        self.widths = list(widths)
        self.calibrated = list(millis)
        self.scale = 1.0  # the real passes' time over the calibrated curve's, learned online
        self.key = key

    @property
    def millis(self) -> list[float]:
        """The curve as it stands: the calibrated times at the measured widths, times the online scale."""
        return [self.scale * m for m in self.calibrated]

    def __call__(self, width: int) -> float:
        """Predicted milliseconds for a pass over ``width`` tokens."""
        return self.scale * self._calibrated(width)

    def _calibrated(self, width: int) -> float:
        widths, millis = self.widths, self.calibrated
        if width <= widths[0]:
            return millis[0]
        i = bisect_left(widths, width)
        if i == len(widths):
            i -= 1
        lo, hi = i - 1, i
        slope = (millis[hi] - millis[lo]) / (widths[hi] - widths[lo])
        return millis[lo] + slope * (width - widths[lo])

    def observe(self, width: int, millis: float) -> None:
        """Refine the curve's scale from one real pass over ``width`` tokens.

        Its shape (what n tokens cost relative to one) stays the calibration's: a pass costs more as the context
        grows, for every width alike (llama.cpp on the 2-core EPYC: 2 tokens cost 1.69x one at 50 cached tokens,
        1.62x at 600, 1.65x at 1,500, while one token went from 6.3 to 10.6 ms). Moving only the widths a
        generation happens to use (one token, mostly) bent the shape toward whatever context they ran at, and
        a long prompt's plain passes alone made drafting look cheap where it was not.
        """
        predicted = self(width)
        if not predicted / OUTLIER <= millis <= predicted * OUTLIER:
            return
        self.scale += ONLINE_WEIGHT * (millis / self._calibrated(width) - self.scale)

    def to_json(self) -> dict:
        return {"key": self.key, "widths": self.widths, "millis": self.calibrated, "measured_at": time.time()}

    def save(self, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.to_json()))
        except OSError:
            pass  # a read-only home: calibrate again next time

    @classmethod
    def load(cls, path: Path, max_age_s: float = MAX_AGE_S) -> CostModel | None:
        """The curve saved at ``path``; None when there is none, it is unreadable, or older than ``max_age_s``."""
        try:
            data = json.loads(path.read_text())
            if not time.time() - float(data["measured_at"]) <= max_age_s:
                return None
            return cls(data["widths"], data["millis"], data.get("key", ""))
        except (OSError, ValueError, KeyError, TypeError):
            return None


def machine_is_busy() -> bool:
    """Whether other work competes for the CPU now (the 1-minute load average is over the core count): a curve
    measured then is used by this process but not saved, so a busy moment is not remembered for days."""
    try:
        return os.getloadavg()[0] > (os.cpu_count() or 1)
    except OSError:
        return False


def device_name(device: torch.device) -> str:
    """The GPU's name on CUDA, else the CPU model."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def cost_key(backend: ModelBackend, model_name: str, threads: int | None) -> str:
    """What a cost curve depends on: backend, model, threads, CPU, and the device, dtype, attention
    implementation, graph mode and KV cache type it runs with (so a CPU curve is never reused on a GPU, nor fp32
    for bf16)."""
    device = torch.device(getattr(backend, "device", "cpu"))
    parts = [backend.backend, model_name, str(threads), cpu_name(), str(os.cpu_count()), str(device),
             device_name(device), str(getattr(backend, "dtype", torch.float32)),
             str(getattr(backend, "attention", "")), f"graphs={bool(getattr(backend, 'graphs', False))}",
             f"kv={getattr(backend, 'kv_type', None) or ''}"]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def clock_for(device: torch.device | str) -> Callable[[], float]:
    """A wall clock in seconds that first waits for the device's queued work (CUDA runs asynchronously)."""
    device = torch.device(device)
    if device.type != "cuda":
        return time.perf_counter

    def synchronized() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()

    return synchronized


def measure(target: Target, widths: tuple[int, ...] = CALIBRATION_WIDTHS, context: int = CALIBRATION_CONTEXT,
            rounds: int = 3, clock: Callable[[], float] = time.perf_counter) -> CostModel:
    """Time chain passes of each width after ``context`` cached tokens; nothing is kept in the cache.

    Each width takes the fastest of ``rounds`` (interference only ever adds time), and the curve is made
    monotone and at most linear: a pass over n tokens never costs more than n one-token passes.
    """
    vocab = target.vocab_size
    context = max(1, min(context, target.max_context - max(widths) - 2))
    widths = tuple(w for w in widths if context + w < target.max_context)
    target.start([(7 * i + 3) % vocab for i in range(context)])
    millis = []
    for width in widths:
        tokens = [(11 * i + 5) % vocab for i in range(width)]
        parents = list(range(-1, width - 1))
        times = []
        for _ in range(rounds + 1):  # the first round warms up
            began = clock()
            target.score(tokens, parents, [width - 1])
            times.append((clock() - began) * 1000)
            target.commit([])
        millis.append(min(times[1:]))
    return CostModel(list(widths), shaped(list(widths), millis))


def shaped(widths: list[int], millis: list[float]) -> list[float]:
    """The curve made monotone and at most linear: n tokens never cost less than fewer, nor more than n
    one-token passes."""
    out = list(millis)
    for i in range(1, len(out)):
        out[i] = min(max(out[i], out[i - 1]), out[0] * widths[i] / widths[0])
    return out


def cost_model_for(backend: ModelBackend, model_name: str, threads: int | None = None,
                   cache_dir: Path | None = None) -> CostModel:
    """The cached curve of this backend, model, thread count and CPU, calibrated now if there is none."""
    key = cost_key(backend, model_name, threads)
    path = (cache_dir or CACHE_DIR) / f"{key}.json"
    model = CostModel.load(path)
    if model is None or model.key != key:
        model = measure(backend.new_target(), clock=clock_for(getattr(backend, "device", "cpu")))
        model.key = key
        if not machine_is_busy():
            model.save(path)
    return model
