"""Write a benchmark's results: ``results.json``, ``report.md`` (tables) and the plots ``speedup.png`` and
``cost_curve.png``."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import fields
from pathlib import Path
from typing import Any

from hasten.adaptive.cost import CALIBRATION_CONTEXT
from hasten.bench.anchors import ANCHORS
from hasten.bench.records import RunRecord
from hasten.bench.summary import against_anchors
from hasten.errors import HastenError

RECORD_FIELDS = tuple(field.name for field in fields(RunRecord))


def _num(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{suffix}"


def _measured(value: float | None, digits: int = 2, suffix: str = "") -> str:
    """A figure that needs a measured prefill: "—" when it is missing (never shown as zero)."""
    return "—" if value is None else f"{value:.{digits}f}{suffix}"


def _speedup(part: dict[str, Any], key: str, basis: str | None, missing: str = "n/a") -> str:
    """``part[key]`` with the prompts it covers (``part[key + "_covers"]``), as ``_covered`` writes it."""
    return _covered(part.get(key), part.get(f"{key}_covers"), basis, missing)


def _covered(value: float | None, covers: list[int] | None, basis: str | None, missing: str = "n/a") -> str:
    """A speedup with the prompts it covers: "1.23x (19/21)" over the prompts where both runs wrote the same
    tokens, "1.23x/tok (21/21)" per new token (``missing`` when there is no figure; "—": without its count)."""
    if value is None and (covers is None or missing == "—"):
        return missing
    figure = missing if value is None else f"{value:.2f}x" + ("/tok" if basis == "per token" else "")
    return figure if covers is None else f"{figure} ({covers[0]}/{covers[1]})"


def anchor_lines(results: dict[str, Any]) -> list[str]:
    """Each ``auto`` row against the anchors that ran on its backend, the best of them (the one it gains least
    over) first: per new token, median over the prompts both ran (``summary.against_anchors``)."""
    by_label: dict[str, list[RunRecord]] = {}
    for saved in results.get("records", []):
        record = RunRecord(**{key: saved[key] for key in RECORD_FIELDS if key in saved})
        by_label.setdefault(record.method, []).append(record)
    methods = results["methods"]
    lines = []
    for label, entry in methods.items():
        anchors = {name: by_label.get(name, []) for name, other in methods.items()
                   if other.get("method") in ANCHORS and other.get("backend") == entry.get("backend")}
        if entry.get("method") != "auto" or not anchors:
            continue
        figures = [f"{name} {_covered(f.value, [f.covered, f.prompts], 'per token')}"
                   for name, f in against_anchors(by_label.get(label, []), anchors).items()]
        lines.append(f"{label} against the best anchor, {figures[0]}" + "".join(f"; {f}" for f in figures[1:]))
    return lines


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def _exact(value: bool | None) -> str:
    return "n/a" if value is None else ("yes" if value else "NO")


def _primary_baseline(results: dict[str, Any]) -> str:
    backend = results.get("backend", "")
    return f"{backend} ar" if backend else "ar"


def _valid(part: dict[str, Any] | None) -> str:
    return "n/a" if part is None else f"{part['valid']}/{part['answers']}"


def table(results: dict[str, Any]) -> str:
    """The leaderboard: one row per method, the speedup over the primary ``ar`` per category, then overall figures
    (and, when some questions are constrained, how many of their answers are valid)."""
    categories = results["categories"]
    constrained = bool(results.get("constrained"))
    header = ["method", *categories, "overall", "vs own ar", "oracle", "tokens/pass", "tokens/s", "decode ms/token",
              "decode speedup", "draft ms/step", "drafted/step", "plain steps", "exact",
              *(["valid JSON"] if constrained else [])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, entry in results["methods"].items():
        basis, own = entry.get("speedup_basis"), entry.get("speedup_own_basis")
        cells = [method]
        cells += [_speedup(entry["categories"][c], "speedup", basis) for c in categories]
        cells += [_speedup(entry, "speedup", basis), _speedup(entry, "speedup_own", own),
                  _num(entry.get("oracle"), suffix="x"), _num(entry["mean_accepted"]),
                  _num(entry["tokens_per_s"], 1), _measured(entry.get("decode_ms_per_token")),
                  _speedup(entry, "decode_speedup", basis, "—"), _num(entry.get("draft_ms_per_step"), 2),
                  _num(entry.get("mean_drafted")), _share(entry.get("plain_steps")), _exact(entry["exact"])]
        cells += [_valid(entry.get("structured"))] if constrained else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def decode_table(results: dict[str, Any]) -> str:
    """Decode speed (prefill left out): per category and overall, each method's decode speedup over the primary
    ``ar``, then over its own backend's, the median prefill and decode ms per token ("—": prefill not measured)."""
    categories = results["categories"]
    header = ["method", *categories, "overall", "vs own ar", "prefill ms", "decode ms/token"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, entry in results["methods"].items():
        basis, own = entry.get("speedup_basis"), entry.get("speedup_own_basis")
        cells = [method, *(_speedup(entry["categories"][c], "decode_speedup", basis, "—") for c in categories)]
        cells += [_speedup(entry, "decode_speedup", basis, "—"), _speedup(entry, "decode_speedup_own", own, "—"),
                  _measured(entry.get("prefill_ms"), 1),
                  _measured(entry.get("decode_ms_per_token"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def oracle_table(results: dict[str, Any]) -> str:
    """Per category, each method's measured speedup over its own backend's ``ar`` beside its oracle bound."""
    categories = [*results["categories"], "overall"]
    header = ["method", *categories]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, entry in results["methods"].items():
        if entry.get("oracle") is None:
            continue
        cells = [method]
        for category in categories:
            part = entry if category == "overall" else entry["categories"][category]
            own = _speedup(part, "speedup_own", entry.get("speedup_own_basis"))
            cells.append(f"{own} / {_num(part.get('oracle'), suffix='x')}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def cost_table(results: dict[str, Any]) -> str:
    """Each backend's cost curve: milliseconds per pass and cost relative to a one-token pass, by width."""
    backends = {name: info["cost"] for name, info in results.get("backends", {}).items() if info.get("cost")}
    if not backends:
        return ""
    widths = sorted({w for cost in backends.values() for w in cost["widths"]})
    units = ("ms", "x one token", "ms at the end")
    header = ["tokens scored"] + [f"{name} {unit}" for name in backends for unit in units]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for width in widths:
        cells = [str(width)]
        for cost in backends.values():
            if width in cost["widths"]:
                i = cost["widths"].index(width)
                end = cost.get("millis_end")
                cells += [_num(cost["millis"][i], 1), _num(cost["millis"][i] / cost["millis"][0]),
                          _num(end[i], 1) if end else "n/a"]
            else:
                cells += ["", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(results: dict[str, Any], command: str | None = None) -> str:
    """The whole ``report.md``: settings, the tables, mismatches, skipped methods and warnings."""
    machine = results["machine"]
    backends = results.get("backends", {})
    threads = ", ".join(f"{name} {info['threads']} threads" for name, info in backends.items()) \
        or f"{machine['threads']} threads"
    baseline = _primary_baseline(results)
    parts = [
        "# hasten bench",
        "",
        f"- model: `{results['model']}`" + (f", draft: `{results['draft_model']}`" if results["draft_model"] else ""),
        f"- backends: {', '.join(backends) or machine['backend']} "
        f"(primary: {results.get('backend', machine['backend'])})",
        f"- {results['prompts']} prompts, max_new_tokens={results['max_new_tokens']}, "
        f"temperature={results['temperature']}, warm-up questions: {results['warmup']}",
        f"- machine: {machine['platform']}, {machine.get('cpus')} CPUs, torch {machine['torch']}, {threads}",
    ]
    parts += [f"- {name}: {info['device']} ({info.get('device_name')}), dtype {info.get('dtype') or 'n/a'}, "
              f"graphs: {info.get('graph_mode')}" + (f"; hf_static: {info['hf_static']}" if "hf_static" in info else "")
              for name, info in backends.items() if "device" in info]
    if command:
        parts.append(f"- command: `{command}`")
    parts += [
        "",
        f"Speedup = median over the prompts where both wrote the same tokens of wall({baseline}) / wall(method) "
        "(prefill included), written `1.23x (19/21)`: 19 of the method's 21 prompts gave the same tokens. Where "
        "the tokens cannot be expected to be equal (samples, anchors, a method on another backend) it is the "
        "median over every prompt both ran of the wall time per new token, written `1.23x/tok (21/21)`. "
        "`vs own ar` = the same against the method's own backend's ar; `oracle` = the bound an oracle draft length "
        "over the method's own candidates reaches under its backend's cost curve (replayed on ar's greedy output, "
        "prefill and drafting not counted); tokens/pass = tokens per target forward pass; tokens/s = all new tokens "
        "/ all wall time; draft ms/step = time in the proposer per pass; drafted/step = drafted tokens per pass; "
        "plain steps = share of steps that drafted nothing; exact = every greedy output equals its own backend's ar "
        "token for token. A method `m@b` runs on backend `b`; anchors run on their library's backend. "
        "decode ms/token and decode speedup leave the prefill out: see *Decode speed*.",
        "",
        table(results),
        "",
        "## Decode speed", "",
        "The prefill is the target's pass over each turn's prompt, the one that yields its first new token. "
        "decode ms/token = (wall - prefill) / (new tokens - turns): the time per token after each turn's first, "
        "median over prompts. Decode speedup = median over the same prompts as the speedup (in brackets) of "
        f"decode ms/token({baseline}) / decode ms/token(method); `vs own ar` against the method's own backend's "
        "ar; prefill ms = median over prompts. — = the prefill was not measured.",
        "",
        decode_table(results),
        "",
    ]
    oracle = oracle_table(results)
    if oracle:
        parts += ["## Oracle bound per category", "",
                  "Measured speedup over the method's own backend's ar / what an oracle draft length over the same "
                  "candidates would reach under the measured cost curve.", "", oracle, ""]
    against = anchor_lines(results)
    if against:
        parts += ["## auto against the anchors", "",
                  "auto's wall time per new token against each anchor's on the same backend (other libraries' own "
                  "decoding; their tokens can differ), median over the prompts both ran; the best anchor, the one "
                  "auto gains least over, first.", "", *(f"- {line}" for line in against), ""]
    costs = cost_table(results)
    if costs:
        parts += ["## Cost curve", "",
                  f"Milliseconds for one target pass scoring n tokens after {CALIBRATION_CONTEXT} cached ones, as "
                  "calibrated before the run (the oracle uses these), and the curve the adaptive drafters had "
                  "refined from the real passes by the end of the run.", "", costs, ""]
    same = {m: e["same_as_primary_ar"] for m, e in results["methods"].items()
            if e.get("method") == "ar" and e.get("same_as_primary_ar") is not None}
    if same:
        parts.append("## Across backends")
        parts += [f"- {m} gives the same tokens as {baseline} on {100 * share:.0f}% of the questions"
                  for m, share in same.items()]
        parts.append("")
    hf = {m: e["same_as_hf_generate"] for m, e in results["methods"].items()
          if m != "hf_generate" and e.get("same_as_hf_generate") is not None}
    if hf:
        parts.append("## Against transformers' own greedy")
        parts.append("")
        parts.append("Exactness above is against each method's own backend's ar. transformers' `generate` may pick "
                     "another token at a near-tie (other kernels, other pass widths); this is how often each "
                     "method's whole answer equals hf_generate's.")
        parts.append("")
        parts += [f"- {m} gives the same tokens as hf_generate on {100 * share:.0f}% of the questions"
                  for m, share in hf.items()]
        parts.append("")
    parts += structured_section(results)
    mismatched = {m: e for m, e in results["methods"].items() if e["mismatches"]}
    if mismatched:
        parts.append("## Outputs that differ from their backend's ar")
        parts += [f"- {m} (vs {e.get('baseline', 'ar')}): {', '.join(map(str, e['mismatches']))}"
                  for m, e in mismatched.items()]
        parts.append("")
    if results["warnings"]:
        parts.append("## Notes")
        parts += [f"- {warning}" for warning in results["warnings"]]
        parts.append("")
    return "\n".join(parts)


def structured_section(results: dict[str, Any]) -> list[str]:
    """The constrained questions' answers that do not parse or validate, per method (no lines when none are
    constrained)."""
    constrained = results.get("constrained")
    if not constrained:
        return []
    lines = ["## Structured answers", "",
             f"{len(constrained)} question(s) carry a response_format; `valid JSON` above counts the answers that "
             "parse and validate against it.", ""]
    invalid = {m: e["structured"]["invalid"] for m, e in results["methods"].items()
               if e.get("structured") and e["structured"]["invalid"]}
    if not invalid:
        return [*lines, "Every answer checked is valid.", ""]
    lines += [f"- {m}: question {bad['question_id']}: {bad['error']}" for m, rows in invalid.items() for bad in rows]
    return [*lines, ""]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(results: dict[str, Any], path: Path) -> None:
    """Grouped bars: for each method, its speedup per category and overall, then its decode speedup (prefill left
    out; no bar where it was not measured); a dashed line at 1.0 (= ar)."""
    plt = _pyplot()
    methods = list(results["methods"])
    groups = [*results["categories"], "overall", "decode"]
    width = 0.8 / len(groups)
    highest = 1.0
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(methods) * max(1, len(groups) / 4)), 4.5))
    for g, group in enumerate(groups):
        values = []
        for method in methods:
            entry = results["methods"][method]
            if group == "decode":
                value = entry.get("decode_speedup")
                values.append(math.nan if value is None else value)
                continue
            value = entry["speedup"] if group == "overall" else entry["categories"][group]["speedup"]
            values.append(value or 0.0)
        highest = max([highest, *(v for v in values if not math.isnan(v))])
        xs = [i - 0.4 + width * (g + 0.5) for i in range(len(methods))]
        ax.bar(xs, values, width, label="decode (no prefill)" if group == "decode" else group,
               edgecolor="black" if group in ("overall", "decode") else None, hatch="//" if group == "decode" else None)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_ylim(0, highest * 1.35)  # room for the legend above the bars
    ax.set_xticks(range(len(methods)), methods, rotation=30 if len(methods) > 6 else 0, ha="right"
                  if len(methods) > 6 else "center")
    ax.set_ylabel(f"speedup over {_primary_baseline(results)} (median)")
    ax.set_title(f"{results['model']}: {results['prompts']} prompts, {results['max_new_tokens']} new tokens")
    ax.legend(fontsize="small", ncols=min(len(groups), 4))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_cost(results: dict[str, Any], path: Path) -> bool:
    """Each backend's cost of a pass relative to one token (left) and in milliseconds (right), by width."""
    backends = {name: info["cost"] for name, info in results.get("backends", {}).items() if info.get("cost")}
    if not backends:
        return False
    plt = _pyplot()
    fig, (rel, ms) = plt.subplots(1, 2, figsize=(10, 4))
    top = max(max(cost["widths"]) for cost in backends.values())
    rel.plot([1, top], [1, top], color="grey", linestyle=":", linewidth=1, label="n one-token passes")
    for name, cost in backends.items():
        rel.plot(cost["widths"], [m / cost["millis"][0] for m in cost["millis"]], marker="o", label=name)
        line = ms.plot(cost["widths"], cost["millis"], marker="o", label=f"{name} (calibrated)")[0]
        if cost.get("millis_end"):
            ms.plot(cost["widths"], cost["millis_end"], linestyle="--", color=line.get_color(),
                    label=f"{name} (end of run)")
    rel.set_xlabel("tokens scored in one pass")
    rel.set_ylabel("cost relative to one token")
    rel.set_ylim(0, None)
    rel.legend(fontsize="small")
    ms.set_xlabel("tokens scored in one pass")
    ms.set_ylabel("milliseconds per pass")
    ms.set_ylim(0, None)
    ms.legend(fontsize="small")
    fig.suptitle(f"{results['model']}: cost of a target pass")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


RECORD_COLUMNS = ("question_id", "category", "method", "backend", "wall_s", "prefill_s", "decode_s", "new_tokens",
                  "decode_tokens", "decode_ms_per_token", "target_passes", "drafted_tokens", "accepted_drafts",
                  "draft_s", "exact", "error", "json_valid", "others_cpu_s")


def write_records_csv(results: dict[str, Any], path: Path) -> None:
    """One row per method and question (``RECORD_COLUMNS``); an empty cell is a value not measured (None)."""
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(RECORD_COLUMNS)
        for record in results.get("records", []):
            writer.writerow(["" if record.get(key) is None else record[key] for key in RECORD_COLUMNS])


def write_report(results: dict[str, Any], out: str | Path, command: str | None = None) -> Path:
    """Write ``results.json``, ``records.csv``, ``report.md``, ``speedup.png`` and ``cost_curve.png`` into
    ``out`` (created)."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise HastenError(f"cannot create output folder {out}: {error}") from error
    if command:
        results = {**results, "command": command}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    write_records_csv(results, out / "records.csv")
    (out / "report.md").write_text(markdown(results, command), encoding="utf-8")
    plot(results, out / "speedup.png")
    plot_cost(results, out / "cost_curve.png")
    return out
