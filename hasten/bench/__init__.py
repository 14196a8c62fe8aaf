"""``hasten bench``: every method against plain decoding on one prompt set, in one process."""

from hasten.bench.prompts import BenchPrompt, balanced_subset, read_prompts, shipped_prompts_path
from hasten.bench.report import write_report
from hasten.bench.runner import run_bench

__all__ = ["BenchPrompt", "balanced_subset", "read_prompts", "run_bench", "shipped_prompts_path", "write_report"]
