#!/bin/bash
# Decode under tensor parallelism on one host, one run at a time (issue 14): the Llama-3-8B shape on 1, 2 and
# 4 GPUs and the Llama-3-70B shape on 2 and 4, the same adapter mixes. Each run gets a time limit; a run that
# passes it dumps every thread's Python stack (faulthandler) and its worker ranks are killed before the next
# one starts, so that a stalled run cannot slow the ones after it. Results: $OUT (default bench_out/tp_scaling).
#
#   bash benchmarks/tp_scaling.sh            # on a host with 4 GPUs
#   SIZES="1 2" bash benchmarks/tp_scaling.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out/tp_scaling}
SIZES=${SIZES:-"1 2 4"}
LIMIT=${LIMIT:-280}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONFAULTHANDLER=1 NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
A="--batches 32 --cases base 1 distinct --skip-itl --skip-prefill"
run() {  # preset tp extra-args...
  local preset=$1 tp=$2; shift 2
  if [ "$tp" -gt "$GPUS" ]; then echo "skip $preset tp=$tp: $GPUS GPUs"; return; fi
  local name="${preset}_tp${tp}"
  # its own process group (setsid), so that the worker ranks it spawned can be found and stopped afterwards
  setsid timeout -s ABRT -k 15 "$LIMIT" python benchmarks/gpu_decode.py --preset "$preset" \
    --tensor-parallel-size "$tp" $A "$@" --out-dir "/tmp/tp_scaling_$name" --json "$OUT/$name.json" \
    > "$OUT/$name.log" 2>&1 &
  local pid=$!
  wait $pid
  echo "rc=$?" >> "$OUT/$name.log"
  if pkill -ABRT -g "$pid" 2>/dev/null; then  # workers left behind: their stacks, then kill them
    sleep 3
    pkill -9 -g "$pid" 2>/dev/null
  fi
  grep -E "^(start-up|per GPU|batch +32 )" "$OUT/$name.log" | sed "s/^/$name: /"
  tail -n 1 "$OUT/$name.log" | sed "s/^/$name: /"
}
for tp in $SIZES; do run llama3-8b "$tp"; done
for tp in $SIZES; do [ "$tp" -ge 2 ] && run llama3-70b "$tp" --max-loras 32; done
exit 0
