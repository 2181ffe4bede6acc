#!/usr/bin/env bash
# One device call that re-checks everything GPU-facing and re-takes every benchmark, logs under $OUT.
#
# Device time is scarce (30 min a session), so build the kernel library here first (nvcc alone, no GPU needed)
# and carry it, with the bitsandbytes wheel for the peer columns:
#   SHARDQ_CACHE=$PWD/.kcache python -c "from shardq.kernels.build import built_library; built_library()"
#   run(command="bash bench/gpu_session.sh [steps]", carry=[".kcache", ".whl"])
# Steps (default all): check tests kernels offload dispatch load; not in the default: "decode" (carry .bnb too:
# the graph-decode GPU tests and bench/bench_decode.py; DECODE_ARGS, DECODE_LIMIT), "train" (the training GPU tests
# and bench/bench_train.py; TRAIN_ARGS), "profile" / "profilewg" (ncu counters of the small-M / Hopper fused-dequant
# 4-bit kernels; PROFILE_M, PROFILE_WG_M). Each is bounded by its own timeout; one call may run 600 s at most, so
# split them. KERNEL_ARGS (e.g. "--shapes 8192x28672 --ms 1,16 --kinds fp16,sq_nf4") narrows the kernels step;
# TEST_ARGS (pytest arguments, split on spaces), TEST_K (a pytest -k expression, kept whole) and TEST_LIMIT
# (seconds) the tests step. "pipeline" runs bench/bench_pipeline.py on the host's idle CPU cores (PIPELINE_ARGS);
# "moe" bench/bench_moe.py (MOE_LIMIT). After a round of GPU-facing changes, one call can check and measure them:
#   TEST_ARGS="tests/test_grouped_experts_gpu.py tests/test_decode_gpu.py tests/test_compile_gpu.py" \
#   DECODE_ARGS="--shapes 1.1B --batches 1 --kinds sq_nf4_fused,sq_nf4_fast" bash bench/gpu_session.sh tests decode moe
set -u
OUT=${OUT:-/tmp/shardq-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 SHARDQ_CACHE=${SHARDQ_CACHE:-$PWD/.kcache}
if [ -d .bnb/site ]; then export PYTHONPATH=$PWD/.bnb/site; fi  # slim bitsandbytes (../shared/anchors/README.md)
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
steps=${*:-check tests kernels offload dispatch load}
summary=()

step() {  # name, timeout seconds, command...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-9s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - t0))" "$(tail -n 1 "$OUT/$name.log")")")
}

for s in $steps; do
  case $s in
    check) step check 120 python3 -m shardq.kernels --check ;;
    tests) step tests ${TEST_LIMIT:-300} python3 -m pytest -q -p no:cacheprovider ${TEST_K:+-k "$TEST_K"} \
             ${TEST_ARGS:-tests/test_kernels_gpu.py tests/test_gemm4_wgmma_gpu.py tests/test_gemm4_flat_gpu.py \
             tests/test_int8_tc_gpu.py tests/test_ops.py tests/test_quant_linear.py \
             tests/test_offload.py tests/test_dispatch_gpu.py tests/test_loader_gpu.py tests/test_quant_experts.py \
             tests/test_quant_targets.py} ;;
    kernels) step kernels 420 python3 bench/bench_kernels.py --out "$OUT" ${KERNEL_ARGS:-} ;;
    profile) for v in ${PROFILE_VARIANTS:-4 1}; do
               step "ncu_v$v" 120 ncu --clock-control none -k regex:'gemm4|gemv4' --launch-skip 1 --launch-count 1 \
                 --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
                 --section WarpStateStats --section SchedulerStats --section InstructionStats \
                 python3 bench/profile_kernel.py --variant "$v" --m "${PROFILE_M:-1}" --calls 2
             done ;;
    profilewg) step ncu_wgmma 150 ncu --clock-control none -k regex:gemm4_wgmma --launch-skip 1 --launch-count 1 \
                 --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
                 --section WarpStateStats --section SchedulerStats --section InstructionStats \
                 python3 bench/profile_kernel.py --wgmma --m "${PROFILE_WG_M:-4096}" --calls 2 ;;
    decode) step decodetests 150 python3 -m pytest -q -p no:cacheprovider tests/test_decode_gpu.py tests/test_dispatch_gpu.py
            step decode ${DECODE_LIMIT:-420} python3 bench/bench_decode.py --out "$OUT" ${DECODE_ARGS:-} ;;
    train) step traintests 200 python3 -m pytest -q -p no:cacheprovider tests/test_train_gpu.py tests/test_train_autograd.py
           step train ${TRAIN_LIMIT:-400} python3 bench/bench_train.py ${TRAIN_ARGS:-} ;;
    moe) step moe ${MOE_LIMIT:-80} python3 bench/bench_moe.py --tokens 1,16,512 --reps 20 --out "$OUT" ;;
    pipeline) step pipeline ${PIPELINE_LIMIT:-240} python3 bench/bench_pipeline.py --out "$OUT" ${PIPELINE_ARGS:-} ;;
    offload) step offload 300 python3 bench/bench_offload.py ;;
    dispatch) step dispatch 240 python3 bench/bench_dispatch.py ;;
    load) step load 540 python3 bench/bench_load.py ${LOAD_ARGS:-} ;;
    *) echo "unknown step $s (check tests kernels profile profilewg decode train moe pipeline offload dispatch load)"; exit 2 ;;
  esac
done
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
printf '%s\n' "${summary[@]}"
