# Sourced by the scripts (not run on its own): PY, the Python that runs main.py (the project's
# ./.venv when install.sh made one, else $PYTHON, else python), OUTPUT_DIR (/kaggle/working when it
# exists, else ./outputs) and the OpenWebText subset (OWT_SUBSET_NUM, default 11000).
export OWT_SUBSET_NUM="${OWT_SUBSET_NUM:-11000}" WANDB_MODE="${WANDB_MODE:-offline}"
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python
fi
if [[ -z "${OUTPUT_DIR:-}" ]]; then
  if [[ -d /kaggle/working ]]; then OUTPUT_DIR=/kaggle/working; else OUTPUT_DIR="$PWD/outputs"; fi
fi
