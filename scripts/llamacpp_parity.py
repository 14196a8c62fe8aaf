"""Plain decoding: hasten's ``ar`` on llama.cpp against llama.cpp's own C++ ``llama-completion`` and
llama-cpp-python's ``create_completion``, on the same prompts and the same token ids.

Usage: python scripts/llamacpp_parity.py [--model default] [--no-chat] [--prompts FILE] [--limit 21]
[--max-new-tokens 128] [--threads 2] [--rounds 1] [--tool-cache q8_0/f16] [--no-python] [--json out.json]

The script holds ``/tmp/hasten-timing.lock`` (flock) while it compiles and times, so nobody else times on the
machine meanwhile; run under ``flock /tmp/hasten-timing.lock`` it sees its parent holding the lock and goes on.

``llama-completion`` is built once (cmake Release, default options, that target only) from the llama.cpp sources
vendored in the sdist of the installed llama-cpp-python version (downloaded once with ``pip download``) into
``~/.cache/hasten/llamacpp-build/<version>``. Each prompt (the first turn of ``hasten bench --limit N``'s prompts)
is chat-templated by hasten (raw text with ``--no-chat``, as for a base model); the C++ tool gets the text that
llama.cpp's own tokenizer turns back into exactly those ids (checked here, and against the tool's count of prompt
tokens), the same threads, context size and greedy sampling, and as many new tokens as ``ar`` wrote
(``--ignore-eos``), with its own default KV cache (F16) and, with ``--tool-cache q8_0/f16``, also with hasten's
(then it writes ar's tokens: same cache, same micro-batches of 512). llama-cpp-python runs as ``hasten bench``'s
``llamacpp_generate`` anchor does (its own defaults: F16 KV cache), stopping at its own end token. One untimed
warm-up of each, then prompt by prompt, in rotating order.

Per tool: prefill in ms per prompt token (the pass over the prompt), decode in ms per new token after the first
(wall time after the prefill, pooled, and the median over prompts; in brackets the time inside ``llama_decode``:
the C++ tool's ``eval time``, hasten's one-token calls timed here, so the rest is each one's host work), tokens/s
with the prefill included (new tokens over the whole generation's wall time; the C++ tool's ``total time``,
which starts after loading). Every C++ run must report as many prompt tokens as hasten's ids.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from tqdm import tqdm

LOCK = Path("/tmp/hasten-timing.lock")
CACHE = Path.home() / ".cache" / "hasten"
TOOL = "llama-completion"
AR, PYTHON = "hasten ar", "create_completion"


@dataclass
class Timing:
    """One tool's run on one prompt."""

    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    wall_s: float
    eval_s: float | None = None  # time in llama_decode after the prompt (the C++ tool's ``eval time``)


# -- the lock


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        with open(f"/proc/{pid}/stat") as stat:
            pid = int(stat.read().rsplit(")", 1)[1].split()[1])
    return pids


def _holders(path: Path) -> set[int]:
    """Processes holding a flock on ``path`` (from /proc/locks)."""
    inode = path.stat().st_ino
    pids = set()
    with open("/proc/locks") as locks:
        for line in locks:
            fields = line.split()
            if "->" in fields or len(fields) < 6 or fields[1] != "FLOCK":
                continue
            if int(fields[5].rsplit(":", 1)[1]) == inode:
                pids.add(int(fields[4]))
    return pids


def hold_timing_lock() -> object:
    """Take the timing lock (wait for it), unless a parent process (``flock`` around this script) holds it."""
    LOCK.touch(exist_ok=True)
    handle = open(LOCK)  # noqa: SIM115 -- held until the process ends
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return handle
    except BlockingIOError:
        if _holders(LOCK) & _ancestors():
            return handle
    print(f"waiting for {LOCK} ...", file=sys.stderr, flush=True)
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


# -- building llama-completion


def vendored_sources(ver: str) -> Path:
    """llama.cpp's sources from the sdist of llama-cpp-python ``ver`` (downloaded and unpacked once)."""
    root = CACHE / "llamacpp-src"
    source = root / f"llama_cpp_python-{ver}" / "vendor" / "llama.cpp"
    if (source / "CMakeLists.txt").is_file():
        return source
    root.mkdir(parents=True, exist_ok=True)
    sdist = root / f"llama_cpp_python-{ver}.tar.gz"
    if not sdist.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={ver}", "--no-deps",
                        "--no-binary", ":all:", "-d", str(root)], check=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(root, filter="data")
    if not (source / "CMakeLists.txt").is_file():
        raise SystemExit(f"{sdist} holds no vendor/llama.cpp")
    return source


def build_tool(ver: str, jobs: int) -> Path:
    """``llama-completion`` built from the vendored sources (Release, default options), once per version."""
    build = CACHE / "llamacpp-build" / ver
    binary = build / "bin" / TOOL
    if binary.is_file():
        return binary
    source = vendored_sources(ver)
    print(f"building {TOOL} from {source} into {build} (once)", file=sys.stderr, flush=True)
    for step in (["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"],
                 ["cmake", "--build", str(build), "--target", TOOL, "-j", str(jobs)]):
        done = subprocess.run(step, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(step)} failed:\n{done.stderr[-3000:]}")
    return binary


# -- the three runs

_PERF = {
    "prompt": re.compile(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens"),
    "eval": re.compile(r"\beval time =\s*([\d.]+) ms /\s*(\d+) runs"),
    "total": re.compile(r"total time =\s*([\d.]+) ms"),
}


def parse_perf(log: str) -> Timing | None:
    """A Timing from the perf lines ``llama-completion`` logs at its end (None if they are missing)."""
    found = {key: pattern.search(log) for key, pattern in _PERF.items()}
    prompt, evals, total = found["prompt"], found["eval"], found["total"]
    if not (prompt and evals and total):
        return None
    return Timing(int(prompt[2]), int(evals[2]) + 1, float(prompt[1]) / 1e3, float(total[1]) / 1e3,
                  float(evals[1]) / 1e3)


def run_tool(binary: Path, model: Path, text: str, new_tokens: int, threads: int, n_ctx: int,
             cache: str | None = None) -> tuple[Timing, str]:
    """One greedy ``llama-completion`` run of ``new_tokens`` tokens on ``text`` (with its default KV cache, or
    ``cache``, ``"K/V"``): its own perf counters, its text."""
    command = [str(binary), "-m", str(model), "-p", text, "--no-escape", "-no-cnv", "--no-display-prompt",
               "-n", str(new_tokens), "--ignore-eos", "--temp", "0", "-t", str(threads), "-tb", str(threads),
               "-c", str(n_ctx), "-s", "0"]
    if cache:
        keys, _, values = cache.partition("/")
        command += ["-ctk", keys, "-ctv", values or keys]
    done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
    timing = parse_perf(done.stderr)
    if done.returncode != 0 or timing is None:
        tail = "\n".join(done.stderr.splitlines()[-15:])
        raise SystemExit(f"{TOOL} failed ({done.returncode}):\n{tail}")
    return timing, done.stdout


def order_for(names: list[str], index: int) -> list[str]:
    """The runs of the ``index``-th prompt: ``names`` rotated, then any C++ run placed after ar (it writes as many
    tokens as ar did)."""
    shift = index % len(names)
    rotated = names[shift:] + names[:shift]
    early = [name for name in rotated[: rotated.index(AR)] if name.startswith(TOOL)]
    rest = [name for name in rotated if name not in early]
    at = rest.index(AR) + 1
    return rest[:at] + early + rest[at:]


def run_ar(loaded: Any, ids: list[int], max_new_tokens: int) -> tuple[Timing, list[int]]:
    """hasten's ``ar`` from an empty prompt cache, timed around ``generate`` as ``hasten bench`` times it; its
    one-token passes' time in ``llama_decode`` as ``eval_s`` (a one-token prompt's prefill counted there too), from
    the model's ``decode_log``."""
    from hasten.api import generate

    loaded.backend.forget_prompts()
    log: list[tuple[int, float]] = []
    loaded.backend.decode_log = log
    try:
        began = time.perf_counter()
        result = generate(loaded, ids, "ar", max_new_tokens=max_new_tokens)
        wall = time.perf_counter() - began
    finally:
        loaded.backend.decode_log = None
    eval_s = sum(seconds for tokens, seconds in log if tokens == 1)
    return Timing(len(ids), len(result.token_ids), result.prefill_s, wall, eval_s), result.token_ids


def run_python(anchor: Any, ids: list[int], max_new_tokens: int) -> Timing:
    """llama-cpp-python's ``create_completion`` greedy, as ``hasten bench``'s ``llamacpp_generate`` runs it."""
    from hasten.sampling import SamplingParams

    began = time.perf_counter()
    out = anchor.run(ids, max_new_tokens, SamplingParams())
    wall = time.perf_counter() - began
    return Timing(len(ids), len(out.token_ids), out.prefill_s or 0.0, wall)


# -- the table


def summary(runs: list[Timing]) -> dict[str, float]:
    """Prefill ms per prompt token, decode ms per token (pooled and the median over prompts), tokens/s."""
    prompt = sum(r.prompt_tokens for r in runs)
    new = sum(r.new_tokens for r in runs)
    prefill = sum(r.prefill_s for r in runs)
    wall = sum(r.wall_s for r in runs)
    per_prompt = [(r.wall_s - r.prefill_s) / (r.new_tokens - 1) for r in runs if r.new_tokens > 1]
    out = {"prompt_tokens": prompt, "new_tokens": new, "prefill_ms": 1e3 * prefill / prompt,
           "decode_ms": 1e3 * (wall - prefill) / max(1, new - len(runs)),
           "decode_ms_median": 1e3 * statistics.median(per_prompt), "tokens_per_s": new / wall}
    evals = [r for r in runs if r.eval_s is not None]
    if evals:
        out["eval_ms"] = 1e3 * sum(r.eval_s or 0.0 for r in evals) / max(1, sum(r.new_tokens - 1 for r in evals))
    return out


def table(results: dict[str, dict[str, float]]) -> str:
    base = results[TOOL]
    lines = ["| | prompt tokens | new tokens | prefill, ms per prompt token | decode, ms a token (median) "
             "| tokens/s, prefill included | vs C++ |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in results.items():
        decode = f"{row['decode_ms']:.2f} ({row['decode_ms_median']:.2f})"
        if "eval_ms" in row:
            decode += f" [in llama_decode {row['eval_ms']:.2f}]"
        lines.append(f"| {name} | {row['prompt_tokens']} | {row['new_tokens']} | {row['prefill_ms']:.2f} | {decode} "
                     f"| {row['tokens_per_s']:.1f} | {row['tokens_per_s'] / base['tokens_per_s']:.2f}x |")
    ar = results[AR]
    median = base["decode_ms_median"] / ar["decode_ms_median"]
    lines.append(f"\nhasten ar vs {TOOL} (speed, >1: ar faster): prefill {base['prefill_ms'] / ar['prefill_ms']:.2f}x, "
                 f"decode {base['decode_ms'] / ar['decode_ms']:.2f}x (median {median:.2f}x), "
                 f"tokens/s {ar['tokens_per_s'] / base['tokens_per_s']:.2f}x")
    if PYTHON in results:
        cc = results[PYTHON]
        lines.append(f"hasten ar vs create_completion: tokens/s {ar['tokens_per_s'] / cc['tokens_per_s']:.2f}x")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="hasten model spec (a .gguf)")
    parser.add_argument("--prompts", type=Path, help="a bench prompt file (default: the shipped prompts)")
    parser.add_argument("--limit", type=int, default=21, help="N prompts across categories, as hasten bench --limit")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="times through the prompts (rotating the order)")
    parser.add_argument("--tool-cache", action="append", default=[], metavar="K/V",
                        help="also run the C++ tool with this KV cache type (q8_0/f16 is hasten's)")
    parser.add_argument("--no-chat", action="store_true", help="raw prompt text, no chat template (a base model)")
    parser.add_argument("--no-python", action="store_true", help="leave llama-cpp-python's create_completion out")
    parser.add_argument("--json", type=Path, help="write every run here")
    args = parser.parse_args()
    lock = hold_timing_lock()
    ver = version("llama-cpp-python")
    binary = build_tool(ver, jobs=os.cpu_count() or 2)

    from hasten.api import prompt_ids
    from hasten.bench.anchors import LlamaCppAnchor
    from hasten.bench.load import OthersClock, others_share
    from hasten.bench.prompts import balanced_subset, read_prompts
    from hasten.models import load_model

    loaded = load_model(args.model, "llamacpp", threads=args.threads)
    assert loaded.path is not None
    anchor = LlamaCppAnchor("llamacpp_generate", loaded)
    llama = anchor.llama
    n_ctx = loaded.max_context
    prompts = balanced_subset(read_prompts(args.prompts), args.limit)  # each one's first turn
    cases = []
    for prompt in prompts:
        ids = (prompt_ids(loaded, prompt.turns[0], chat=False) if args.no_chat
               else prompt_ids(loaded, [{"role": "user", "content": prompt.turns[0]}]))
        # where the model adds BOS itself (Gemma), the tool's tokenizer adds it again to a text that spells it
        body = ids[1:] if ids[:1] == [llama.token_bos()] and llama.tokenize(b"", add_bos=True) else ids
        text = llama.detokenize(body, special=True).decode("utf-8")
        if llama.tokenize(text.encode("utf-8"), add_bos=True, special=True) != ids:
            raise SystemExit(f"prompt {prompt.question_id}: llama.cpp does not tokenize its text back to the ids")
        cases.append((prompt.question_id, ids, text))

    run_ar(loaded, cases[0][1], 8)  # warm-ups, untimed
    run_python(anchor, cases[0][1], 8)
    run_tool(binary, loaded.path, cases[0][2], 8, args.threads, n_ctx)
    caches = {TOOL: None, **{f"{TOOL}, {cache} cache": cache for cache in args.tool_cache}}
    names = [*caches, AR] + ([] if args.no_python else [PYTHON])
    runs: dict[str, list[Timing]] = {name: [] for name in names}
    same_text = dict.fromkeys(caches, 0)  # runs where a C++ run wrote ar's text
    others, began = OthersClock(), time.perf_counter()
    others.start()
    for index, (qid, ids, text) in enumerate(tqdm(cases * args.rounds, desc="prompts", file=sys.stderr)):
        ar_tokens, ar_text = 0, ""
        for name in order_for(names, index):
            if name == AR:
                timing, ar_ids = run_ar(loaded, ids, args.max_new_tokens)
                ar_tokens, ar_text = timing.new_tokens, llama.detokenize(ar_ids).decode("utf-8", "replace")
            elif name == PYTHON:
                timing = run_python(anchor, ids, args.max_new_tokens)
            else:
                timing, written = run_tool(binary, loaded.path, text, ar_tokens, args.threads, n_ctx, caches[name])
                # llama.cpp's pieces of the tokens both; --ignore-eos bans the end token, so where ar wrote one the
                # C++ tool writes some other last token
                same_text[name] += written.strip().startswith(ar_text.strip())
                if timing.prompt_tokens != len(ids):
                    raise SystemExit(f"prompt {qid}: {TOOL} ran {timing.prompt_tokens} prompt tokens, not {len(ids)}")
            runs[name].append(timing)
    others_cpu = others_share(others.stop(), time.perf_counter() - began) or 0.0  # the C++ runs are our children
    anchor.close()
    del lock
    results = {name: summary(timings) for name, timings in runs.items()}
    print(f"{len(cases)} prompts x {args.rounds}, {args.threads} threads, n_ctx {n_ctx}, greedy, up to "
          f"{args.max_new_tokens} new tokens; llama-cpp-python {ver}; {TOOL} {binary}")
    print(table(results))
    for name, same in same_text.items():
        print(f"{name} wrote ar's text on {same} of {len(cases) * args.rounds} prompts (up to ar's end token)")
    print(f"other processes used {100 * others_cpu:.0f}% of the machine's CPUs while this timed"
          + (" -- NOT IDLE, the numbers are not comparable" if others_cpu > 0.05 else ""))
    if args.json:
        every = {name: [asdict(timing) for timing in timings] for name, timings in runs.items()}
        args.json.write_text(json.dumps({"results": results, "others_cpu_share": others_cpu, "runs": every}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
