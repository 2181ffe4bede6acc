#!/usr/bin/env bash
# One device call after a round of GPU-facing changes: the kernel check, the GPU tests of what changed, then the
# benchmarks that measure it, each bounded by its own timeout; logs and JSON under $OUT, a short table last.
#   run(command="bash bench/gpu_round.sh", carry=[".kcache", ".bnb"])
# ROUND_TESTS (pytest files), ROUND_K (a -k expression) and ROUND_STEPS (default: check tests decode train moe
# pipeline) narrow it; TESTS_LIMIT, DECODE_LIMIT and MOE_LIMIT (seconds) bound those steps.
set -u
OUT=${OUT:-/tmp/shardq-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 SHARDQ_CACHE=${SHARDQ_CACHE:-$PWD/.kcache}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -d .bnb/site ]; then export PYTHONPATH=$PWD/.bnb/site:$PYTHONPATH; fi
summary=()
step() {  # name, timeout seconds, command...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-9s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - t0))" "$(tail -n 1 "$OUT/$name.log")")")
}
for s in ${ROUND_STEPS:-check tests decode train moe pipeline}; do
  case $s in
    check) step check 60 python3 -m shardq.kernels --check ;;
    tests) step tests ${TESTS_LIMIT:-170} python3 -m pytest -q -p no:cacheprovider -rf ${ROUND_K:+-k "$ROUND_K"} \
             ${ROUND_TESTS:-tests/test_grouped_experts_gpu.py tests/test_decode_gpu.py tests/test_distributed_gpu.py \
             tests/test_compile_gpu.py tests/test_train_gpu.py} ;;
    decode) step decode ${DECODE_LIMIT:-110} python3 bench/bench_decode.py --shapes 1.1B --batches 1 --out "$OUT" \
              --kinds ${DECODE_KINDS:-sq_nf4_fused,sq_int8_fused,sq_nf4_fast} ;;
    train) step train 70 python3 bench/bench_train.py --shapes 1.1b --contenders bnb,shardq --out "$OUT" ;;
    moe) step moe ${MOE_LIMIT:-80} python3 bench/bench_moe.py --tokens 1,16,512 --reps 20 --out "$OUT" ;;
    pipeline) step pipeline 90 python3 bench/bench_pipeline.py --out "$OUT" ;;
    *) echo "unknown step $s"; exit 2 ;;
  esac
done
grep -E "^FAILED|passed|failed" "$OUT/tests.log" 2>/dev/null | tail -12
for f in decode train moe pipeline; do [ -f "$OUT/$f.log" ] && tail -n 8 "$OUT/$f.log"; done
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
printf '%s\n' "${summary[@]}"
