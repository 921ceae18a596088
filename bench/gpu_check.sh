#!/usr/bin/env bash
# One short run on a lent GPU machine (see ../shared/GPU.md): install, test on CUDA, benchmark.
# Everything lands in $OUT (default bench/results/gpu-latest): log.txt, tests.xml, the benches'
# JSON files and gpu_check.json; a short table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-latest}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
start=$SECONDS
# The whole run must end within a device session (9 minutes): each step's limit is cut to what is
# left of BUDGET seconds, and a step with nothing left is recorded as timed out (rc=124) at 0 s.
BUDGET=${BUDGET:-520}

step() {  # step NAME SECONDS COMMAND...: run with a time limit, record its status
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - (SECONDS - start)))
    if ((left <= 0)); then
        echo "=== $name skipped: no time left ==="
        echo "$name rc=124 seconds=0" | tee -a "$OUT/steps.txt"
        return
    fi
    ((limit > left)) && limit=$left
    echo "=== $name (limit ${limit}s) ==="
    local t0=$SECONDS
    timeout "$limit" "$@"
    local rc=$?
    echo "$name rc=$rc seconds=$((SECONDS - t0))" | tee -a "$OUT/steps.txt"
}

step install 120 python3 -m pip install --no-build-isolation --no-deps -e .
python3 - <<'PY'
import torch, triton, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "| triton", triton.__version__,
      "| transformers", transformers.__version__, "|", torch.cuda.get_device_name(0))
PY
# As ../shared/GPU.md orders them: the CUDA correctness tests first (the bf16 kernels have never
# executed anywhere: the interpreter runs them upcast), then the benches no GPU run has measured
# yet, then those measured before. The limits add up to more than BUDGET: when every step runs
# long, the figures measured before are the ones cut.
# trl and datasets are not installed on the GPU machine; that file runs in CI on the CPU.
# The tests/bench/test_bench_*.py files rerun benches in --quick mode: they would eat the tests step.
# The sm_90 compile tests need no GPU and CI runs them under this machine's Triton too: skipped here.
# tests/kernels runs first, with the GPU-only cases: tensors past 2**31 elements (a long document,
# an lm_head-sized LoRA GEMM, a 16.7M-position cache head) and, with two GPUs, kernels on cuda:1.
step tests 150 python3 -m pytest tests -q --maxfail=10 --ignore tests/training/test_trainer.py \
    --ignore-glob 'tests/bench/test_bench_*.py' --ignore-glob 'tests/kernels/test_compile_sm90_*.py' \
    --junitxml "$OUT/tests.xml" -p no:cacheprovider
step bench_multi_lora 90 python3 bench/bench_multi_lora.py --quick --out "$OUT"
step bench_paged_decode 60 python3 bench/bench_paged_decode.py --quick --out "$OUT"
step bench_serving_engine 90 python3 bench/bench_serving_engine.py --quick --out "$OUT"
# Each provider in a fresh Python; Liger's column needs liger-kernel there (the bench says so if absent).
step bench_linear_cross_entropy 100 python3 bench/bench_linear_cross_entropy.py --quick --timeout 90 \
    --out "$OUT/linear_cross_entropy_quick.json"
# bench_lora compiles and times every way its two GEMMs can run, side by side
# (kernels/lora_gemm.py, gemm_ways): hence 150 s.
step bench_varlen_attention 110 python3 bench/bench_varlen_attention.py --quick --out "$OUT"
step bench_kv_cache 70 python3 bench/bench_kv_cache.py --quick --out "$OUT"
step bench_lora 150 python3 bench/bench_lora.py --quick --out "$OUT"
step eval_kv_quality 50 python3 bench/eval_kv_quality.py --quick --out "$OUT"
step demo 50 python3 bench/demo.py --quick --out "$OUT"
python3 bench/gpu_summary.py "$OUT"
echo "total seconds: $((SECONDS - start))"
