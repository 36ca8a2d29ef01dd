#!/usr/bin/env bash
# The decode loop's GPU rows in one call (issue 29): Llama-3.1-8B's shapes with random weights (no weights travel
# to a lent GPU machine), bf16 on cuda. Results (JSON lines and gpu_speed.json) go to $OUT (default gpu_out).
#
#   bash benchmarks/gpu_decode.sh            # on the GPU machine: about 6-9 minutes on an H100/H200
#   bash benchmarks/gpu_decode.sh --smoke    # tiny shapes on the CPU: checks that every step runs
#
# 1. decode ms/token at batch 1 over a 1K and a ~128K cache, with each decode step mode side by side: dynamic
#    (eager, shapes growing), fixed (eager, fixed shapes) and graph (the fixed step replayed as a CUDA graph; its
#    tokens must be the fixed step's: same_tokens in decode.jsonl);
# 2. decode steps of batch 1 and 16 over one 1K and one ~128K context: the context's KV held once (shared-prefix
#    attention, dynamic step) and copied per row, in each step mode (at 128K, 16 copies do not fit: that row
#    records out of memory);
# 3. RAPID against target-only decoding at 32K and 128K (gpu_speed.py: tokens/s of rapid, rapid-self and
#    rapid-self-agree next to full).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
python="${PYTHON:-python}"
if [[ "${1:-}" == "--smoke" ]]; then
    decode=("$python" benchmarks/decode_speed.py --model random-llama-3.1-8b --smoke --device cpu)
    # (no CUDA graphs on the CPU: the fixed step they capture stands in)
    long=(--context-tokens 256 --prefill-chunk 64 --step dynamic,fixed)
    short=(--context-tokens 128 --step dynamic,fixed)
    speed=("$python" benchmarks/gpu_speed.py --smoke --contexts 512 --methods full,rapid)
else
    decode=("$python" benchmarks/decode_speed.py --model random-llama-3.1-8b --device cuda --dtype bfloat16)
    long=(--context-tokens 130000 --prefill-chunk 8192 --step dynamic,fixed,graph)
    short=(--context-tokens 1024 --step dynamic,fixed,graph)
    speed=("$python" benchmarks/gpu_speed.py --contexts 32768,131072 --methods full,rapid --prefill-chunk 8192
           --time-budget 240)
fi
for size in short long; do
    declare -n context="$size"
    "${decode[@]}" "${context[@]}" --only batch1,sweep --repeats 3 --sweep 1,16 --out "$OUT/decode.jsonl"
done
OUT="$OUT" "${speed[@]}"
