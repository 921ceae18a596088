#!/usr/bin/env bash
# One short run on a lent GPU machine (see ../shared/GPU.md): install, preflight, test on CUDA, benchmark.
# Everything lands in $OUT (default bench/results/gpu-latest): log.txt, step_<name>.json written as each
# step ends (a run cut short keeps what finished), collect.txt, tests_<file>.xml and .log per test file, the benches'
# JSON files, and gpu_check.json gathered from them by bench/gpu_summary.py, whose table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-latest}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
start=$SECONDS
# The whole run must end within a device session, 9 minutes from a cold machine: the step limits below
# add up to BUDGET (520 s), which leaves the summary and the shell's own seconds. A step's limit is
# cut to what is left of BUDGET; a step with no time left is recorded as skipped (rc=124, 0 s).
BUDGET=${BUDGET:-520}
# A step gets SIGINT GRACE seconds before its limit, SIGKILL at it: on SIGINT pytest stops and still
# writes its junit xml (on SIGTERM it writes none). `timeout` signals the step's whole process group.
GRACE=10
export OUT

step() {  # step NAME SECONDS COMMAND...: run under a time limit, then write $OUT/step_NAME.json
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - (SECONDS - start))) t0=$SECONDS rc=124
    ((limit > left)) && limit=$left
    if ((limit > GRACE)); then
        echo "=== $name (limit ${limit}s) ==="
        timeout -s INT -k "$GRACE" "$((limit - GRACE))" "$@"
        rc=$?
    else
        echo "=== $name skipped: no time left ==="
    fi
    printf '{"name": "%s", "rc": %d, "started": %d, "seconds": %d, "limit": %d}\n' \
        "$name" "$rc" "$((t0 - start))" "$((SECONDS - t0))" "$limit" >"$OUT/step_$name.json"
    echo "=== $name rc=$rc seconds=$((SECONDS - t0)) ==="
}

pytest_each() {  # pytest_each PATH...: one pytest process per PATH, all at once, each with its xml and log
    printf '%s\n' "$@" | xargs -P 16 -I{} bash -c 'name=$(echo "${1%.py}" | tr / _)
        python3 -m pytest "$1" -q --maxfail=20 -p no:cacheprovider --junitxml "$OUT/$name.xml" >"$OUT/$name.log" 2>&1
        echo "$1: $(tail -n 1 "$OUT/$name.log")"' _ {}
}
export -f pytest_each

step install 45 python3 -m pip install --no-build-isolation --no-deps -e .
# From the repository root, where a folder of ours could shadow a dependency of the same name
# (kernels/ and PyPI's `kernels`): the package, its kernels and the serving stack import, and pytest
# collects every test file (an error there would stop a whole pytest run before its first test).
step preflight 30 bash -c 'python3 - <<"PY" || exit
import torch, triton, transformers
import fused_train, fused_train.serving
from fused_train.kernels import (int8_decode_attention, int8_kv_quantize, linear_cross_entropy, lora, multi_lora,
                                 paged_decode_attention, varlen_attention)
print("torch", torch.__version__, "cuda", torch.version.cuda, "| triton", triton.__version__, "| transformers",
      transformers.__version__, "|", torch.cuda.get_device_name(0), "with",
      torch.cuda.get_device_properties(0).multi_processor_count, "SMs")
PY
python3 -m pytest --collect-only -q -p no:cacheprovider tests >"$OUT/collect.txt" 2>&1
collected=$?
tail -n 3 "$OUT/collect.txt"
exit $collected'
# The CUDA correctness tests of the kernels first (the bf16 kernels have never executed anywhere: the
# interpreter runs them upcast), with the GPU-only cases: tensors past 2**31 elements and, with two
# GPUs, kernels on cuda:1. One process per file, all at once: their ~280 kernel specializations
# compile cold on the 16 cores in parallel. The sm_90 compile tests need no GPU (CI runs them).
step tests_kernels 150 bash -c 'pytest_each $(ls tests/kernels/test_*.py | grep -v test_compile_sm90_)'
# Then the benches, the figures no run has produced first: varlen attention fwd/bwd against SDPA and
# flex, paged decode against the HBM bandwidth, multi-LoRA at 1 to 32 adapters, the engine against
# per-request peft on an 8B-shaped random Llama, fused linear cross-entropy against HF (and Liger
# where installed). Left out, for a later run: the rest of the suite (CI runs it on CPU; its
# kernel paths are those tested above), bench_lora (measured: bench/results/bench_lora_*_h200_quick.json),
# bench_kv_cache, eval_kv_quality and the demo.
step bench_varlen_attention 60 python3 bench/bench_varlen_attention.py --quick --out "$OUT"
step bench_paged_decode 40 python3 bench/bench_paged_decode.py --quick --out "$OUT"
step bench_multi_lora 45 python3 bench/bench_multi_lora.py --quick --layer-only --out "$OUT"
step bench_serving_engine 75 python3 bench/bench_serving_engine.py --model 8b --adapters 8 --requests 32 \
    --ways engine_int8,peft_naive --out "$OUT"
# Each provider in a fresh Python, at most --timeout seconds each (4 providers).
step bench_linear_cross_entropy 75 python3 bench/bench_linear_cross_entropy.py --quick --timeout 16 \
    --out "$OUT/linear_cross_entropy_quick.json"
python3 bench/gpu_summary.py "$OUT"
echo "total seconds: $((SECONDS - start))"
