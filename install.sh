#!/usr/bin/env bash
# Install duo into ./.venv (or into the current Python with --system, e.g. on Kaggle/Colab).
#
#   ./install.sh [--system] [--lm-eval]
#
# torch: an existing one is kept (the venv sees the system's packages, so Kaggle's and Colab's CUDA
# builds stay). Where none is importable: on a machine without an NVIDIA GPU the CPU build of
# torch==2.13.0 (from PyTorch's CPU wheel index when it answers, else the default index, whose
# Linux wheel bundles the CUDA libraries: several GB); with an NVIDIA GPU the default (CUDA) build.
# --lm-eval also installs lm-evaluation-harness and makes `lm_eval --model dlm` find harness.py
# (lm_eval_plugin/: a .pth file in site-packages; README).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
SYSTEM=0 LM_EVAL=0
for arg in "$@"; do
  case "$arg" in
    --system) SYSTEM=1 ;;
    --lm-eval) LM_EVAL=1 ;;
    *) echo "error: unknown argument $arg (use --system and/or --lm-eval)" >&2; exit 2 ;;
  esac
done
if [[ $SYSTEM == 0 ]]; then
  [[ -x .venv/bin/python ]] || "$PY" -m venv --system-site-packages .venv
  PY=.venv/bin/python
fi
TORCH="torch==${DUO_TORCH_VERSION:-2.13.0}"
CPU_INDEX=https://download.pytorch.org/whl/cpu
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "install.sh: an NVIDIA GPU is present: installing $TORCH (CUDA build) from the default index"
    "$PY" -m pip install "$TORCH"
  elif "$PY" -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=5)" "$CPU_INDEX" 2>/dev/null; then
    echo "install.sh: no NVIDIA GPU: installing $TORCH (CPU build) from $CPU_INDEX"
    "$PY" -m pip install "$TORCH" --index-url "$CPU_INDEX"
  else
    echo "install.sh: no NVIDIA GPU, and $CPU_INDEX does not answer: installing $TORCH from the default index"
    "$PY" -m pip install "$TORCH"
  fi
fi
"$PY" -m pip install -r requirements.txt
if [[ $LM_EVAL == 1 ]]; then
  "$PY" -m pip install -r requirements-lm-eval.txt
  "$PY" lm_eval_plugin/duo_lm_eval.py  # lets `lm_eval --model dlm` find harness.py
fi
"$PY" -c "import torch, lightning, hydra, transformers, datasets; print(f'duo install ok: torch {torch.__version__}, lightning {lightning.__version__}')"
if [[ $SYSTEM == 0 ]]; then
  echo "Run the commands with .venv/bin/python (or first: source .venv/bin/activate)"
fi
