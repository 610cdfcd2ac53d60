#!/usr/bin/env bash
# Everything the GPU benchmarks and GPU tests need, in one device call of under 10 minutes:
#     bash bench/gpu_checks.sh                    # every step but the experiments (over 10 min: split it)
#     bash bench/gpu_checks.sh profile evaluate   # only the steps named (see `pick` below)
# $OUT (or outputs/gpu_checks) gets gpu_checks.log and each step's JSON (the device tool brings
# back at most eight files).
# On the lent GPU machine (no hydra-core/omegaconf there) carry the wheels first, as
# docs/BENCHMARKS.md says: .whl/{hydra_core,omegaconf,antlr4_python3_runtime}-*.whl.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_checks}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# (once per machine: a warm machine's later calls find /tmp/site)
if ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import hydra" 2>/dev/null; then
  [ -d /tmp/site/hydra ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
LOG="$OUT/gpu_checks.log"
{ date -u; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; git log -1 --oneline 2>/dev/null; } | tee "$LOG"
step() {  # step SECONDS COMMAND...: time-limited, logged; a failing step does not stop the others
  local limit=$1
  shift
  echo "== $*" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | grep -v -i "warn" > "$OUT/step.log"
  local rc=${PIPESTATUS[0]}
  cat "$OUT/step.log" >> "$LOG"
  tail -12 "$OUT/step.log"
  rm -f "$OUT/step.log"
  echo "== exit $rc" | tee -a "$LOG"
}
# name steps to run only those (bash bench/gpu_checks.sh chat_compile evaluate); none: all
SELECTED="$*"
run_all=$([ $# -eq 0 ] && echo 1)
named() { [[ " $SELECTED " == *" $1 "* ]]; }
pick() { [ -n "$run_all" ] || named "$1"; }
pick tests && step 330 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ -k "not max-autotune"
# the GPU tests without the 7B gate (the decode step runs it)
named tests_fast && step 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ -k "not 7b_paths"
# the engine's and the static decoder's GPU tests only (row-bounded steps: a graph per rows and length)
named engine_tests && step 90 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_engine.py tests/test_static_decode.py
# the gate of the engine's rows on the 7B shape alone (admissions' fused prefill, row steps): ~1 min
named engine_gate && step 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_decode_gate.py -k engine_rows
# the gate on the 7B shape (every path but max-autotune, batch 1, 8, 32) and the speed of ours,
# ours compiled and transformers' static cache at batch 1 and 32
# (~360 s, 357 s on 2026-12-02 before the engine rows gate was added: run it in a call of its own)
pick decode && step 450 python3 bench/bench_decode.py --batches 1 32 --gate-batches 1 8 32 --gate-paths dynamic static "static compile" --paths static "static compile" "hf static"
pick first_turn && step 90 python3 bench/bench_chat.py --first-turn-only
pick chat && step 120 python3 bench/bench_chat.py --repeats 3 --turns 6
pick profile && step 90 python3 bench/profile_step.py
named profile32 && step 60 python3 bench/profile_step.py --batches 32
# where a serving engine's admission goes (host against GPU time, kernels; issue 16): ~1 min
named profile_admission && step 150 python3 bench/profile_admission.py --graph-admissions
pick profile_unfused && step 90 python3 bench/profile_step.py --unfused --batches 1
pick evaluate && step 240 python3 bench/bench_evaluate.py --batches 1 32
# evaluate.py's rows through the serving engine beside its static batches (issue 16, item 4)
named evaluate_engine && step "${EVAL_ENGINE_LIMIT:-200}" python3 bench/bench_evaluate.py --batches 32 --skip-stock --engine
# the same with answers of different lengths (each row its own, 16-256 tokens): where the engine should win
named evaluate_varied && step "${EVAL_ENGINE_LIMIT:-200}" python3 bench/bench_evaluate.py --batches 32 --skip-stock --engine --lengths varied
pick chat_compile && step 180 python3 bench/bench_chat.py --compile
# the API under 1/8/32/64 streaming clients. The image has no FastAPI: also carry, in .whl/,
# fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.13.4 pydantic-core==2.46.4
# annotated-types==0.7.0 typing-inspection==0.4.2 opentelemetry-api==1.45.2 anyio click h11 sniffio
# (pip download as the device README says)
# (API_ARGS: more options, e.g. "--admit-wait-ms 20 0 50" soaks each)
named api && step "${API_LIMIT:-420}" python3 bench/bench_api.py --soak "${SOAK:-300}" ${API_ARGS:-}
# decode attention alone: SDPA as the fused step calls it against a split-K Triton kernel (issue 13): ~1 min
named attention && step 150 python3 bench/bench_attention.py
# only the speed of int8/int4 at batch 1 beside fp16 ours and transformers' static (no gate)
named quant_speed && step 110 python3 bench/bench_decode.py --no-gate --batches 1 --quant int8 int4 --paths static "hf static"
# (quant_compile, int8/int4 with generation.compile, is gone: compiled int8 ran 98 tokens/s against
# 267 with the Triton kernels on 2026-12-02, and compile is now off on int weights)
# our weight-only int8/int4, three steps that `quant` runs together (over 10 minutes: name them
# one call each):
# quant_kernels: the step's matrix products alone (fp16 cuBLAS, our int8/int4 kernels), a prefill's
# products, and batch-1 decoding of fp16/int8/int4 with each prefill timed alone: ~3.5 min fresh
(named quant || named quant_kernels) && step 240 python3 bench/bench_quant_kernels.py --decode
# quant_tests: the kernels against the torch reference (~3 min)
(named quant || named quant_tests) && step 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_quant.py
# quant_gate: each int path against its own eager forward and against fp16 (int4 with groups of 32
# too, an experiment), the speed beside fp16 ours and transformers' static (223 s on a warm
# machine without int4-g32, over 330 s on a fresh one with it, 2026-12-03)
(named quant || named quant_gate) && step 480 python3 bench/bench_decode.py --batches 1 32 --gate-batches 1 8 32 --gate-paths static --quant int8 int4 int4-g32 --paths static "hf static"
# Nsight Compute on each shape's batch-1 product (fp16 cuBLAS, int8, int4): stall reasons,
# occupancy, bandwidth (ncu reads the counters on this Firecracker machine; ~1 min). The report
# itself is too big to bring back: details.txt holds its text.
named ncu && step 300 bash -c 'ncu --clock-control none --nvtx --nvtx-include "profile/" --set full -f -o "$OUT/products" python3 bench/ncu_products.py >/dev/null && ncu -i "$OUT/products.ncu-rep" --page details > "$OUT/details.txt" && rm -f "$OUT/products.ncu-rep" && grep -E "^  [a-zA-Z_]|Duration|DRAM Throughput|Registers Per|Achieved Occupancy|Issue Slots Busy" "$OUT/details.txt"'
# peak memory of the whole 7B model (random weights) loaded and answering as chat does
(named memory || named memory_int8) && step 90 python3 bench/bench_decode.py --memory int8
named memory && step 90 python3 bench/bench_decode.py --memory int4
named memory && step 90 python3 bench/bench_decode.py --memory fp16
# int8/int4 with chat's cache at its full 2,048 slots (a conversation that reached chat.max_context)
named memory_full && step 90 python3 bench/bench_decode.py --memory int8 --full-cache
named memory_full && step 90 python3 bench/bench_decode.py --memory int4 --full-cache
# int4 with chat.max_context=1000, its cache full (1,024 slots)
named memory_context && step 90 python3 bench/bench_decode.py --memory int4 --context 1000 --full-cache
# the gate on the 7B shape for the max-autotune path (compiles for minutes)
named gate_autotune && step 420 python3 bench/bench_decode.py --gate-only --gate-paths "static max-autotune-no-cudagraphs"
exit 0
