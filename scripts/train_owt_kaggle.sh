#!/usr/bin/env bash
# Train on the first OWT_SUBSET_NUM documents of OpenWebText with the Kaggle defaults:
# algo=duo_base, model=small, model.length=512, fp16 mixed precision (trainer.precision=16),
# 8 sequences per GPU, 64 per optimizer step (one or two T4s), stopping cleanly after MAX_TIME.
#
#   scripts/train_owt_kaggle.sh [extra Hydra overrides ...]     e.g. trainer.max_steps=5000
#
# Re-running the same command resumes from <run dir>/checkpoints/last.ckpt. Settings from the
# environment (defaults in brackets): OWT_SUBSET_NUM [11000], ALGO [duo_base], MODEL [small],
# LENGTH [512], MAX_TIME [00:11:00:00, DD:HH:MM:SS], OUTPUT_DIR [/kaggle/working, else ./outputs],
# RUN_DIR [$OUTPUT_DIR/owt$OWT_SUBSET_NUM-$ALGO-$MODEL-L$LENGTH], PYTHON [./.venv/bin/python when it
# exists, else python].
# Without internet: data.data_files=/kaggle/input/<dataset>/*.parquet. On a CPU, precision 16
# falls back to 32 (main.py says so).
set -euo pipefail
source "$(dirname "$0")/env.sh"
export OWT_SUBSET_NUM="${OWT_SUBSET_NUM:-11000}"
ALGO="${ALGO:-duo_base}" MODEL="${MODEL:-small}" LENGTH="${LENGTH:-512}"
RUN_DIR="${RUN_DIR:-$OUTPUT_DIR/owt$OWT_SUBSET_NUM-$ALGO-$MODEL-L$LENGTH}"
args=(mode=train data=openwebtext-split "algo=$ALGO" "model=$MODEL" "model.length=$LENGTH"
      trainer.precision=16 loader.batch_size=8 loader.global_batch_size=64 loader.eval_batch_size=8
      "trainer.max_time=${MAX_TIME:-00:11:00:00}" checkpointing.every_n_train_steps=1000
      checkpointing.keep_last=1 "hydra.run.dir='$RUN_DIR'" "$@")
echo "+ OWT_SUBSET_NUM=$OWT_SUBSET_NUM $PY main.py ${args[*]}"
exec "$PY" main.py "${args[@]}"
