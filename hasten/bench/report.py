"""Write a benchmark's results: ``results.json``, a Spec-Bench-like ``report.md`` table and ``speedup.png``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hasten.errors import HastenError


def _num(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{suffix}"


def _exact(value: bool | None) -> str:
    return "n/a" if value is None else ("yes" if value else "NO")


def table(results: dict[str, Any]) -> str:
    """The leaderboard: one row per method, the speedup per category, then overall figures."""
    categories = results["categories"]
    header = ["method", *categories, "overall", "mean accepted", "tokens/s", "exact"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, entry in results["methods"].items():
        cells = [method]
        cells += [_num(entry["categories"][c]["speedup"], suffix="x") for c in categories]
        cells += [_num(entry["speedup"], suffix="x"), _num(entry["mean_accepted"]), _num(entry["tokens_per_s"], 1),
                  _exact(entry["exact"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(results: dict[str, Any], command: str | None = None) -> str:
    """The whole ``report.md``: settings, the table, mismatches, skipped methods and warnings."""
    machine = results["machine"]
    parts = [
        "# hasten bench",
        "",
        f"- model: `{results['model']}`" + (f", draft: `{results['draft_model']}`" if results["draft_model"] else ""),
        f"- {results['prompts']} prompts, max_new_tokens={results['max_new_tokens']}, "
        f"temperature={results['temperature']}, warm-up questions: {results['warmup']}",
        f"- machine: {machine['platform']}, torch {machine['torch']}, {machine['threads']} threads, "
        f"backend {machine['backend']}",
    ]
    if command:
        parts.append(f"- command: `{command}`")
    parts += [
        "",
        "Speedup = median over prompts of wall(ar) / wall(method) on the same prompt; mean accepted = tokens per "
        "target forward pass; tokens/s = all new tokens / all wall time.",
        "",
        table(results),
        "",
    ]
    mismatched = {m: e["mismatches"] for m, e in results["methods"].items() if e["mismatches"]}
    if mismatched:
        parts.append("## Outputs that differ from ar")
        parts += [f"- {m}: {', '.join(map(str, ids))}" for m, ids in mismatched.items()]
        parts.append("")
    if results["warnings"]:
        parts.append("## Notes")
        parts += [f"- {warning}" for warning in results["warnings"]]
        parts.append("")
    return "\n".join(parts)


def plot(results: dict[str, Any], path: Path) -> None:
    """Grouped bars: for each method, its speedup per category and overall; a dashed line at 1.0 (= ar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(results["methods"])
    groups = [*results["categories"], "overall"]
    width = 0.8 / len(groups)
    highest = 1.0
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(methods) * max(1, len(groups) / 4)), 4.5))
    for g, group in enumerate(groups):
        values = []
        for method in methods:
            entry = results["methods"][method]
            value = entry["speedup"] if group == "overall" else entry["categories"][group]["speedup"]
            values.append(value or 0.0)
        highest = max(highest, *values)
        xs = [i - 0.4 + width * (g + 0.5) for i in range(len(methods))]
        ax.bar(xs, values, width, label=group, edgecolor="black" if group == "overall" else None)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_ylim(0, highest * 1.35)  # room for the legend above the bars
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylabel("speedup over ar (median)")
    ax.set_title(f"{results['model']}: {results['prompts']} prompts, {results['max_new_tokens']} new tokens")
    ax.legend(fontsize="small", ncols=min(len(groups), 4))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: dict[str, Any], out: str | Path, command: str | None = None) -> Path:
    """Write ``results.json``, ``report.md`` and ``speedup.png`` into ``out`` (created if needed)."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise HastenError(f"cannot create output folder {out}: {error}") from error
    if command:
        results = {**results, "command": command}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    (out / "report.md").write_text(markdown(results, command), encoding="utf-8")
    plot(results, out / "speedup.png")
    return out
