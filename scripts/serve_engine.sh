#!/usr/bin/env bash
# Serve a ctxopt model with vLLM's CPU build on 127.0.0.1, in the foreground (Ctrl-C stops it).
#
#   bash scripts/serve_engine.sh [MODEL] [PORT] [extra vLLM arguments...]
#   bash scripts/serve_engine.sh smollm2-135m 8000 --no-enable-prefix-caching
#
# MODEL is a ctxopt registry name (default smollm2-135m), converted once into ctxopt's cache by the main venv's
# python and served under that name, or a model folder (`ctxopt train color-merge --out DIR`), served under the
# folder's name. Sets the engine venv up first (scripts/engine.sh). Threads: the engine uses $ENGINE_THREADS
# OpenMP threads (default 1), KV cache $VLLM_CPU_KVCACHE_SPACE GiB (default 2).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
model="${1:-smollm2-135m}"
port="${2:-8000}"
shift $(( $# < 2 ? $# : 2 ))
engine_python="$(bash "$root/scripts/engine.sh" | tail -n 1)"
ctxopt_python="${CTXOPT_PYTHON:-$root/.venv/bin/python}"
if [ -d "$model" ]; then  # a model folder (e.g. from `ctxopt train color-merge`), served under its folder name
    folder="$(cd "$model" && pwd)"
    model="$(basename "$folder")"
else
    folder="$("$ctxopt_python" -c "import sys; from ctxopt.models import registry_path; print(registry_path(sys.argv[1]))" "$model")"
fi
echo "serving $model from $folder on http://127.0.0.1:$port/v1" >&2
exec env OMP_NUM_THREADS="${ENGINE_THREADS:-1}" VLLM_CPU_OMP_THREADS_BIND=nobind \
    VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 \
    "$engine_python" -m vllm.entrypoints.openai.api_server --model "$folder" --served-model-name "$model" \
    --host 127.0.0.1 --port "$port" --max-model-len 8192 --dtype bfloat16 --enable-prompt-embeds "$@"
