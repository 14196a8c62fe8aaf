"""The target's cost curve: wall time of one verification pass as a function of its width and the cached context.

Measured once per backend, model, thread count, CPU, device, dtype and graph mode in a calibration of a few
seconds (with a clock that waits for the GPU on CUDA): passes that read every row's logits, as verification does,
over chains and bushy trees (the dearer of the two), at a few cache lengths (a pass costs more after a longer
context). Kept on disk, and refined online by the real passes: one scale for the whole curve, and per width a
slow, bounded correction of its shape where many passes disagree with the calibration.
Speculation pays only where tokens gained are worth more than the extra width costs, so every adaptive choice
asks this curve.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from bisect import bisect_left
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import TypeVar

import torch

from hasten.backends.base import ModelBackend, Target

Shape = TypeVar("Shape", bound=Hashable)
CACHE_DIR = Path(os.environ.get("HASTEN_CACHE", Path.home() / ".cache" / "hasten")) / "costs"
COST_VERSION = 4  # what a curve measures (2: every row read, trees, cache lengths; 3: every width to 16; 4:
# llama.cpp without its tiled K-quant matmul); older curves are not reused
CALIBRATION_WIDTHS = (1, 2, 3, 4, 6, 8, 12, 16, 24)  # wider passes: extended along the last two
CALIBRATION_CONTEXT = 512  # the cache length the whole curve is measured at, and the one assumed until told
CALIBRATION_CONTEXTS = (64, 512, 1024)  # clamped to the model's context; longer: extended along the last two
CONTEXT_WIDTHS = (1, 4, 16)  # at the other cache lengths (3 rounds): the shape in between is the main curve's
DENSE_WIDTHS = 16  # every width up to this one is measured at the main context (quantized kernels make bumps)
TREE_WIDTHS = (4, 8, 16)  # widths whose bushy trees are timed beside their chains
TREE_BRANCHES = 4  # a calibration tree hangs this many chains below the root (one sequence id each on llama.cpp)
ONLINE_WEIGHT = 0.05  # weight of one measured pass in the running estimate of the curve's scale
SHAPE_PRIOR = 100.0  # pseudo-passes that say the calibrated shape is right, against each width's own evidence
SHAPE_MEMORY = 400.0  # a width's evidence fades beyond about this many of its passes
SHAPE_BOUND = 0.25  # a width's correction moves its cost by at most this fraction either way
SHAPE_CLIP = 0.3  # one pass's log-disagreement with the curve counts at most this much
MAX_AGE_S = 7 * 24 * 3600.0  # a saved curve is measured again after a week (drivers, builds and loads change)
OUTLIER = 3.0  # a pass this many times off its prediction (preempted, or a cold cache) teaches nothing


def cpuinfo(field: str) -> str | None:
    """The first value of ``field`` in ``/proc/cpuinfo`` (None where there is none, or no such file)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what the platform says."""
    return cpuinfo("model name") or platform.processor() or platform.machine()


def interpolate(xs: Sequence[int], ys: Sequence[float], x: float, extend: bool = True) -> float:
    """``ys`` at ``x``, linear between the increasing ``xs``; flat below the first; past the last, extended along
    the last two where they rise (flat where they fall, or unless ``extend``)."""
    if x <= xs[0] or len(xs) == 1:
        return ys[0]
    if x >= xs[-1]:
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        return ys[-1] + (max(0.0, slope) * (x - xs[-1]) if extend else 0.0)
    hi = bisect_left(xs, x)
    return ys[hi - 1] + (ys[hi] - ys[hi - 1]) * (x - xs[hi - 1]) / (xs[hi] - xs[hi - 1])


def capped(widths: Sequence[int], millis: Sequence[float]) -> list[float]:
    """The curve made at most linear: n tokens never cost more than n one-token passes. It need not rise with
    the width: on transformers (fp32, 2 CPU threads) a pass over 2 or 3 tokens cost 95 and 115 ms, over 4 82."""
    return [min(m, millis[0] * w / widths[0]) for w, m in zip(widths, millis, strict=True)]


class CostModel:
    """Milliseconds per pass by width and cached context: a grid of calibrated times (one row per context, one
    column per width), interpolated linearly in both and extended past the widest width and longest context.

    ``context`` is the cache length the model was last told (``at_context``); ``cost(width)`` prices a pass there.
    Until told, it is ``CALIBRATION_CONTEXT`` (within the measured contexts: a model with a shorter context has
    its own longest).
    A curve built from one row of times (``contexts`` left out) costs the same at every context.
    """

    def __init__(self, widths: Sequence[int], millis: Sequence[float] | Sequence[Sequence[float]], key: str = "",
                 contexts: Sequence[int] | None = None) -> None:
        rows = [list(map(float, row)) for row in millis] if contexts is not None else [list(map(float, millis))]
        if not widths or sorted(set(widths)) != list(widths) or any(len(row) != len(widths) for row in rows):
            raise ValueError("a cost curve needs increasing widths, one time each")
        if contexts is not None and (len(contexts) != len(rows) or sorted(set(contexts)) != list(contexts)):
            raise ValueError("a cost grid needs increasing contexts, one row of times each")
        self.widths = list(widths)
        self.contexts = list(contexts) if contexts is not None else [CALIBRATION_CONTEXT]
        self.grid = rows
        self.key = key
        self.context = min(max(CALIBRATION_CONTEXT, self.contexts[0]), self.contexts[-1])  # until told
        self.scale = 1.0  # the real passes' time over the curve's, learned online
        self._evidence = [0.0] * len(widths)  # per width: the passes (weighted) that judged its shape
        self._disagreement = [0.0] * len(widths)  # and their mean log(real / predicted), fading
        self._version = 0  # bumped whenever the shape's correction changes
        self._row: tuple[tuple[int, int], list[float]] | None = None

    def at_context(self, context: int) -> CostModel:
        """Price passes after ``context`` cached tokens from now on; returns the curve itself."""
        self.context = max(0, int(context))
        return self

    def calibrated_at(self, context: int | None = None) -> list[float]:
        """The calibrated times at the measured widths after ``context`` (default: the current) cached tokens."""
        context = self.context if context is None else context
        contexts, grid = self.contexts, self.grid
        if len(contexts) == 1 or context <= contexts[0]:
            return list(grid[0])
        i = min(bisect_left(contexts, context), len(contexts) - 1)
        lo, hi = grid[i - 1], grid[i]
        t = (context - contexts[i - 1]) / (contexts[i] - contexts[i - 1])
        if t <= 1:
            return [a + t * (b - a) for a, b in zip(lo, hi, strict=True)]
        return [b + (t - 1) * max(0.0, b - a) for a, b in zip(lo, hi, strict=True)]  # longer: never cheaper

    @property
    def corrections(self) -> list[float]:
        """Per measured width, the factor real passes have taught its shape (1.0: the calibration's). The
        narrowest width is the reference: its level, like every width's, is the scale's to learn."""
        bound = math.log1p(SHAPE_BOUND)
        return [math.exp(max(-bound, min(bound, mean * n / (n + SHAPE_PRIOR))))
                for n, mean in zip(self._evidence, self._disagreement, strict=True)]

    def shape_at(self, context: int | None = None) -> list[float]:
        """The curve at the measured widths after ``context`` cached tokens, corrected online, before the scale."""
        context = self.context if context is None else context
        if self._row is not None and self._row[0] == (context, self._version):
            return self._row[1]
        row = capped(self.widths, [m * c for m, c in zip(self.calibrated_at(context), self.corrections, strict=True)])
        self._row = ((context, self._version), row)
        return row

    @property
    def calibrated(self) -> list[float]:
        """The calibrated times at the measured widths, at the current context."""
        return self.calibrated_at()

    @property
    def millis(self) -> list[float]:
        """The curve as it stands at the current context: corrected shape times the online scale."""
        return [self.scale * m for m in self.shape_at()]

    def __call__(self, width: int, context: int | None = None) -> float:
        """Predicted milliseconds for a pass over ``width`` tokens (after ``context`` cached tokens: default, the
        context the curve was last told)."""
        return self.scale * interpolate(self.widths, self.shape_at(context), width)

    def observe(self, width: int, millis: float, context: int | None = None) -> None:
        """Refine the curve from one real pass over ``width`` tokens after ``context`` cached tokens.

        Mostly its scale: a machine that is busier or quieter than at calibration slows or speeds every width
        alike. Its shape (what n tokens cost relative to one) moves only slowly, and only by a bounded amount at
        a width where many passes disagree with it: moving only the widths a generation happens to use (one
        token, mostly), and not knowing the context they ran at (llama.cpp on the 2-core EPYC: one token took 6.3
        ms after 50 cached tokens, 10.6 after 1,500), once made drafting look cheap where it was not.
        """
        predicted = self(width, context)
        if not predicted / OUTLIER <= millis <= predicted * OUTLIER:
            return
        calibrated = interpolate(self.widths, self.calibrated_at(context), width)
        disagreement = max(-SHAPE_CLIP, min(SHAPE_CLIP, math.log(millis / (self.scale * calibrated))))
        self.scale += ONLINE_WEIGHT * (self.scale * millis / predicted - self.scale)
        for i, weight in self._neighbours(width):
            if i == 0:
                continue
            self._evidence[i] = min(SHAPE_MEMORY, self._evidence[i] + weight)
            self._disagreement[i] += weight / self._evidence[i] * (disagreement - self._disagreement[i])
        self._version += 1

    def _neighbours(self, width: int) -> list[tuple[int, float]]:
        """The measured widths a pass over ``width`` tokens informs, with the weights of linear interpolation."""
        widths = self.widths
        if width <= widths[0]:
            return [(0, 1.0)]
        if width >= widths[-1]:
            return [(len(widths) - 1, 1.0)]
        hi = bisect_left(widths, width)
        t = (width - widths[hi - 1]) / (widths[hi] - widths[hi - 1])
        return [(i, w) for i, w in ((hi - 1, 1.0 - t), (hi, t)) if w > 0]

    def calibration(self) -> CostModel:
        """A fresh curve with this one's calibration only (no scale or correction learned online)."""
        return CostModel(self.widths, self.grid, self.key, self.contexts)

    def to_json(self) -> dict:
        return {"version": COST_VERSION, "key": self.key, "widths": self.widths, "contexts": self.contexts,
                "millis": self.grid, "measured_at": time.time()}

    def save(self, path: Path) -> None:
        """Write the curve to ``path`` whole (through a temporary file: a reader never sees half of it)."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            temporary.write_text(json.dumps(self.to_json()))
            temporary.replace(path)
        except OSError:
            pass  # a read-only home: calibrate again next time

    @classmethod
    def load(cls, path: Path, max_age_s: float = MAX_AGE_S) -> CostModel | None:
        """The curve saved at ``path``; None when there is none, it is unreadable, of another version, or older
        than ``max_age_s``."""
        try:
            data = json.loads(path.read_text())
            if data.get("version") != COST_VERSION or not time.time() - float(data["measured_at"]) <= max_age_s:
                return None
            return cls(data["widths"], data["millis"], data.get("key", ""), data["contexts"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
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
    """What a cost curve depends on: what it measures (``COST_VERSION``), backend, model, threads, CPU, and the
    device, dtype, attention implementation, graph mode and KV cache type it runs with (so a CPU curve is never
    reused on a GPU, nor fp32 for bf16)."""
    device = torch.device(getattr(backend, "device", "cpu"))
    parts = [f"v{COST_VERSION}", backend.backend, model_name, str(threads), cpu_name(), str(os.cpu_count()),
             str(device), device_name(device), str(getattr(backend, "dtype", torch.float32)),
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


def bushy(width: int, branches: int = TREE_BRANCHES) -> list[int]:
    """The parents of a calibration tree over ``width`` tokens: the root and ``branches`` chains below it."""
    return [-1] + [0 if j <= branches else j - branches for j in range(1, width)]


def fastest(target: Target, shapes: dict[Shape, list[int]], rounds: int, clock: Callable[[], float]
            ) -> dict[Shape, float]:
    """The fastest of ``rounds`` verification passes over each tree (by name: its parents) after the cache,
    every row read (as verification reads them); nothing is kept.

    The rounds go round the shapes, so each is timed across the whole measurement and all of them under the
    same conditions (a machine slowed for a moment slows no width alone), and passes of changing widths
    follow each other, as in decoding. Interference only ever adds time: the fastest is the pass's own.
    """
    best = dict.fromkeys(shapes, math.inf)
    for _ in range(rounds):
        for name, parents in shapes.items():
            width = len(parents)
            tokens = [(11 * i + 5) % target.vocab_size for i in range(width)]
            began = clock()
            target.score(tokens, parents, list(range(width)))
            best[name] = min(best[name], (clock() - began) * 1000)
            target.commit([])
    return best


def chain(width: int) -> list[int]:
    """The parents of a chain of ``width`` tokens."""
    return list(range(-1, width - 1))


def extend(target: Target, filler: list[int], length: int) -> None:
    """Run ``filler`` into the cache up to ``length`` tokens (one pass, only its last row read)."""
    n = length - target.cache_len
    if n > 0:
        target.score(filler[target.cache_len:length], chain(n), [n - 1])
        target.commit(list(range(n)))


def measure(target: Target, widths: Sequence[int] = CALIBRATION_WIDTHS,
            contexts: Sequence[int] = CALIBRATION_CONTEXTS, rounds: int = 3,
            clock: Callable[[], float] = time.perf_counter, *, tree_widths: Sequence[int] = TREE_WIDTHS,
            context_widths: Sequence[int] = CONTEXT_WIDTHS, context_rounds: int = 3,
            dense_widths: int = DENSE_WIDTHS) -> CostModel:
    """Time verification passes, every row read, of each width after each of ``contexts`` cached tokens (clamped to the
    model's context): the cache is filled to the longest first, then cut down to each in turn, so the passes of
    every context are timed within a few seconds of each other (it is left holding filler).

    The context nearest ``CALIBRATION_CONTEXT`` gets chains of every width and bushy trees (``bushy``) of
    ``tree_widths``, the fastest of ``rounds`` each (``fastest``): where a tree costs more than a chain (on
    llama.cpp each of its leaves is a sequence id of its own) that ratio, interpolated between those widths, prices
    every width; every width up to ``dense_widths`` is timed there too, since a curve need not be smooth between the
    listed widths (Gemma 3 Q4_K_M on llama.cpp: 5, 7, 9-11 and 13-15 tokens cost 10-20% more than their neighbours'
    interpolation; transformers fp32: 6 and 7 tokens cost 102 and 123 ms, 8 92). The other contexts get chains of
    ``context_widths``, ``context_rounds`` times: a longer cache adds attention, which changes the shape slowly, so
    there the main row is rescaled by the ratios measured. Each row is made at most linear (``capped``).
    """
    widths = [w for w in widths if w + 2 < target.max_context]
    room = target.max_context - widths[-1] - 2
    lengths = sorted({max(1, min(c, room)) for c in contexts})
    main = min(lengths, key=lambda c: (abs(c - CALIBRATION_CONTEXT), c))
    filler = [(7 * i + 3) % target.vocab_size for i in range(lengths[-1])]
    target.start(filler[: lengths[0]])
    extend(target, filler, lengths[-1])  # filled once, first: then every context's passes follow each other
    measured: dict[int, dict[int, float]] = {}
    trees: dict[int, float] = {}
    for length in reversed(lengths):
        target.truncate(length)
        fastest(target, {"warm-up": chain(1)}, 1, clock)  # the first pass after a long one is often slow
        if length == main:
            times = fastest(target, {**{("chain", w): chain(w) for w in widths},
                                     **{("tree", w): bushy(w) for w in tree_widths if 2 < w <= widths[-1]}},
                            rounds, clock)
            trees = {w: t for (shape, w), t in times.items() if shape == "tree"}
            dense = [w for w in range(1, min(dense_widths, widths[-1]) + 1) if w not in widths]
            times |= fastest(target, {("chain", w): chain(w) for w in dense}, rounds, clock)
        else:
            at = [w for w in context_widths if w <= widths[-1]] or widths[:1]
            times = fastest(target, {("chain", w): chain(w) for w in at}, context_rounds, clock)
        measured[length] = {w: t for (shape, w), t in times.items() if shape == "chain"}
    widths = sorted(measured[main])
    row = [measured[main][w] for w in widths]
    if trees:  # the dearer of a chain and a tree, the ratio interpolated (a tree of 1 or 2 tokens is a chain)
        chains = {w: m for w, m in zip(widths, row, strict=True) if w <= 2}
        row = rescaled(widths, row, chains | {w: max(t, interpolate(widths, row, w)) for w, t in trees.items()})
    row = capped(widths, row)
    grid = [row if length == main else rescaled(widths, row, measured[length]) for length in lengths]
    return CostModel(widths, grid, contexts=lengths)


def rescaled(widths: Sequence[int], row: Sequence[float], times: dict[int, float]) -> list[float]:
    """``row`` (times at ``widths``) rescaled width by width to pass through ``times`` (some widths' times),
    the ratio interpolated between them (flat past them), and ``capped``."""
    at = sorted(times)
    ratios = [times[w] / interpolate(widths, row, w) for w in at]
    return capped(widths, [m * interpolate(at, ratios, w, extend=False) for w, m in zip(widths, row, strict=True)])


def prune(directory: Path, max_age_s: float = MAX_AGE_S) -> None:
    """Delete the curves in ``directory`` that would not be used again: of another version, or too old."""
    for path in directory.glob("*.json"):
        if CostModel.load(path, max_age_s) is None:
            path.unlink(missing_ok=True)


def cost_model_for(backend: ModelBackend, model_name: str, threads: int | None = None,
                   cache_dir: Path | None = None) -> CostModel:
    """The cached curve of this backend, model, thread count and CPU, calibrated now if there is none (stale
    curves beside it are deleted then)."""
    key = cost_key(backend, model_name, threads)
    directory = cache_dir or CACHE_DIR
    path = directory / f"{key}.json"
    model = CostModel.load(path)
    if model is None or model.key != key:
        target = backend.new_target()
        try:
            model = measure(target, clock=clock_for(getattr(backend, "device", "cpu")))
        finally:
            close = getattr(target, "close", None)
            if close is not None:
                close()
        model.key = key
        if not machine_is_busy():
            prune(directory)
            model.save(path)
    return model
