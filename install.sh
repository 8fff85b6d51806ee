#!/usr/bin/env bash
# Install duo into ./.venv (or into the current Python with --system, e.g. on Kaggle/Colab).
# The venv sees system site-packages so that a preinstalled CUDA torch is kept; only when no
# torch is importable do we install the CPU build, never an unpinned (multi-GB CUDA) one.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [[ "${1:-}" != "--system" ]]; then
  [[ -x .venv/bin/python ]] || "$PY" -m venv --system-site-packages .venv
  PY=.venv/bin/python
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install "torch==${DUO_TORCH_VERSION:-2.13.0}"
fi
"$PY" -m pip install -r requirements.txt
"$PY" -c "import torch, lightning, hydra, transformers, datasets; print(f'duo install ok: torch {torch.__version__}, lightning {lightning.__version__}')"
