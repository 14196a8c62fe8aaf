"""``hasten bench``: every method against plain decoding on one prompt set, in one process."""

from hasten.bench.prompts import (
    BenchPrompt,
    balanced_subset,
    read_prompts,
    select_categories,
    shipped_prompts_path,
    with_response_format,
)
from hasten.bench.report import write_report
from hasten.bench.runner import run_bench

__all__ = ["BenchPrompt", "balanced_subset", "read_prompts", "run_bench", "select_categories", "shipped_prompts_path",
           "with_response_format", "write_report"]
