# Sourced by the scripts (not run on its own): runs from the project root and sets
#   PY          the Python that runs main.py: $PYTHON when set, else the project's ./.venv (made by
#               install.sh) when it exists, else `python` on the PATH;
#   OUTPUT_DIR  where runs go: $OUTPUT_DIR when set, else /kaggle/working when it exists, else ./outputs;
#   WANDB_MODE  offline unless set.
# checkpoint_arg "$@" sets CKPT to the first argument when it is not a Hydra override (key=value)
# and ARGS to the remaining arguments; run_main ARGS... prints the command and runs main.py.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export WANDB_MODE="${WANDB_MODE:-offline}"
if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
  PY="$PWD/.venv/bin/python"
else
  PY=python
fi
if [[ -z "${OUTPUT_DIR:-}" ]]; then
  if [[ -d /kaggle/working ]]; then OUTPUT_DIR=/kaggle/working; else OUTPUT_DIR="$PWD/outputs"; fi
fi
checkpoint_arg() {
  CKPT=""
  if [[ $# -gt 0 && "$1" != *=* ]]; then CKPT="$1"; shift; fi
  ARGS=("$@")
}
run_main() {
  echo "+ $PY main.py $*"
  exec "$PY" main.py "$@"
}
